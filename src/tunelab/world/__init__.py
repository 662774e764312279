"""TinyWorld: the seeded synthetic world that tunelab-tiny is pretrained on and measured with.

    world = make_world(seed=0)             # people, cities -> countries, jobs, pets, ...
    docs = make_corpus(world)              # pretraining documents (join with EOS_TOKEN)
    write_tasks("out/", seed=0)            # out/<task>/<split>.jsonl + manifest.json
    resolve_task("tinyworld:qa@test")      # cached jsonl path, usable as data.train / data.eval

Everything is a pure function of the seed: same seed, byte-identical output.
"""

from tunelab.world.chat import (
    CHAT_TEMPLATE,
    EOS_TOKEN,
    IM_END,
    IM_START,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    render_chat,
)
from tunelab.world.corpus import held_out_text, make_corpus
from tunelab.world.generator import RELATION_NAMES, Person, World, make_world
from tunelab.world.prefs import score_response
from tunelab.world.resolve import cache_dir, is_tinyworld, resolve_task
from tunelab.world.tasks import SPLITS, TASKS, write_tasks

__all__ = [
    "CHAT_TEMPLATE", "EOS_TOKEN", "IM_END", "IM_START", "PAD_TOKEN", "SPECIAL_TOKENS", "RELATION_NAMES",
    "SPLITS", "TASKS", "Person", "World", "cache_dir", "held_out_text", "is_tinyworld", "make_corpus",
    "make_world", "render_chat", "resolve_task", "score_response", "write_tasks",
]
