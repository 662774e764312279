"""What the RL objectives (ppo, grpo, rloo) score their replies with: a registered reward or a reward model.

A reward is a Python function `fn(reply, record) -> float` of a reply's text (special tokens removed) and
its data record, registered by name (`register_reward`): built in, exact_match, contains_answer and
numeric, each against the record's "answer". A config only NAMES a reward (`objective.reward`): nothing
is imported from a config; your own is registered from your own script before `tunelab.train`. The
alternative is `objective.reward_model`: a scalar-head model (objective reward) scoring (prompt, reply).

Here: the registry and the built-in rewards; `RewardChoice`, the two config fields and their checks;
the records a reward sees (`read_tasks`, `prompt_of`); `Scorer`, which checks every record has the fields
its reward needs (each missing one named as file:line, before training) and scores replies, refusing a
non-finite reward; `compare`, the evaluation of greedy replies against the reference's.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import Field, field_validator, model_validator

from tunelab.config import ObjectiveConfig, did_you_mean
from tunelab.data.formats.chat import chat_messages
from tunelab.data.pipeline import read_records, split_path
from tunelab.errors import DataError, TunelabError
from tunelab.inference.reward import rewards_of
from tunelab.modeling.heads import is_reward_model
from tunelab.objectives.frozen import load_frozen
from tunelab.objectives.registry import RunContext

# ----------------------------------------------------------------------------- the registry

RewardFn = Callable[[str, dict[str, Any]], float]  # (reply text, the data record) -> reward


@dataclass(frozen=True)
class Reward:
    fn: RewardFn
    needs: tuple[str, ...]  # record fields it reads, checked on every record before training
    summary: str


REWARDS: dict[str, Reward] = {}


def register_reward(name: str, fn: RewardFn, *, needs: tuple[str, ...] = (), summary: str = "",
                    replace: bool = False) -> None:
    """Make `fn(reply, record) -> float` the reward `objective.reward: <name>` names. Call it from your own
    script before `tunelab.train`: a config can only name a registered reward, never import one."""
    if not callable(fn):
        raise TypeError(f"reward {name!r}: {fn!r} is not callable")
    if name in REWARDS and not replace:
        raise ValueError(f"reward {name!r} is already registered (pass replace=True to replace it)")
    REWARDS[name] = Reward(fn, tuple(needs), summary)


def normalize(text: str) -> str:
    """Lower case, single spaces, no surrounding spaces, quotes or final punctuation."""
    return " ".join(str(text).lower().split()).strip(" \"'`").rstrip(".!?;:,").strip()


_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def first_number(text: str) -> float | None:
    found = _NUMBER.search(str(text))
    return float(found.group().replace(",", "")) if found else None


def exact_match(reply: str, record: dict[str, Any]) -> float:
    return float(normalize(reply) == normalize(record["answer"]))


def contains_answer(reply: str, record: dict[str, Any]) -> float:
    """The normalised answer inside the normalised reply, not as part of a longer word or number."""
    answer = normalize(record["answer"])
    return float(bool(answer) and re.search(rf"(?<![\w.]){re.escape(answer)}(?![\w])", normalize(reply)) is not None)


def numeric(reply: str, record: dict[str, Any]) -> float:
    want, got = first_number(record["answer"]), first_number(reply)
    return float(want is not None and got is not None and want == got)


register_reward("exact_match", exact_match, needs=("answer",), summary="normalised reply == the record's answer")
register_reward("contains_answer", contains_answer, needs=("answer",), summary="the answer appears in the reply")
register_reward("numeric", numeric, needs=("answer",), summary="the reply's first number == the answer's")

# ----------------------------------------------------------------------------- the config fields


class RewardChoice(ObjectiveConfig):
    """`reward` (a registered function, by name) or `reward_model` (a path): exactly one; `default_reward`,
    when a subclass sets one, is the reward of a config that names neither."""

    default_reward: ClassVar[str | None] = None
    reward: str | None = Field(None, description="a registered reward by name: exact_match, contains_answer, "
                               "numeric, or your own (register_reward in your script); never imported")
    reward_model: str | None = Field(None, description="a reward model (objective reward run dir, or a scalar-head "
                                     "model) instead")

    @field_validator("reward")
    @classmethod
    def _registered(cls, v: str | None) -> str | None:
        if v is not None and v not in REWARDS:
            raise ValueError(f"unknown reward {v!r}{did_you_mean(v, REWARDS)}; registered: "
                             f"{', '.join(sorted(REWARDS))} (a config never imports code: register your own with "
                             "tunelab.objectives.rewards.register_reward in your script)")
        return v

    @model_validator(mode="before")
    @classmethod
    def _default_reward(cls, data: Any) -> Any:
        if cls.default_reward and isinstance(data, dict) and data.get("reward") is None \
                and data.get("reward_model") is None:
            return {**data, "reward": cls.default_reward}
        return data

    @model_validator(mode="after")
    def _one_reward(self) -> RewardChoice:
        if self.reward is not None and self.reward_model is not None:
            raise ValueError("set one of reward (a registered function, e.g. exact_match) and reward_model, not both")
        if self.reward is None and self.reward_model is None:
            raise ValueError("set one of reward (a registered function, e.g. exact_match) and reward_model "
                             "(a reward model run dir)")
        return self


# ----------------------------------------------------------------------------- records


def read_tasks(data_cfg: Any) -> dict[str, dict[str, dict[str, Any]]]:
    """split -> `where` -> record, for every record of data.train and data.eval (validated by the pipeline)."""
    return {split: {w: r for w, r in read_records(split_path(data_cfg, split)) if isinstance(r, dict)}
            for split, path in (("train", data_cfg.train), ("eval", data_cfg.eval)) if path is not None}


def is_chat(record: dict[str, Any]) -> bool:
    return "messages" in record or "conversations" in record


def prompt_of(record: dict[str, Any]) -> Any:
    """The prompt: a record's `prompt`, or a chat without its final assistant turn."""
    if not is_chat(record):
        return record["prompt"]
    messages = chat_messages(record)
    return messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages


# ----------------------------------------------------------------------------- scoring


class Scorer:
    """Scores replies to the records of `records` (`where` -> record) with the objective's `reward` (a
    registered function of reply and record) or its `reward_model` (loaded frozen, of prompt and reply)."""

    def __init__(self, cfg: RewardChoice, records: dict[str, dict[str, Any]], device: torch.device):
        self.name, self.records = cfg.reward, records
        self.label = cfg.reward or cfg.reward_model
        self.model = self.tokenizer = None
        if cfg.reward_model is not None:
            self.model, self.tokenizer = load_frozen(cfg.reward_model, device, "reward model")
            if not is_reward_model(self.model):
                raise TunelabError(f"{cfg.reward_model}: not a reward model (a scalar head)",
                                   fix="train one with objective reward and method head (num_labels: 1)")

    @classmethod
    def of_run(cls, ctx: RunContext) -> Scorer:
        """The scorer of a run: every record of data.train and data.eval, each checked (before training)."""
        splits = read_tasks(ctx.cfg.data)
        scorer = cls(ctx.cfg.objective, {w: r for records in splits.values() for w, r in records.items()}, ctx.device)
        scorer.check([e.where for e in ctx.examples] + list(splits.get("eval", {})))
        return scorer

    def check(self, where: list[str]) -> None:
        """Refuse, before any training, records that lack a field the reward reads (each as file:line)."""
        needs = REWARDS[self.name].needs if self.name is not None else ()
        bad = [f"{w}: missing field {k!r} (reward {self.name})" for w in where for k in needs
               if k not in self.records.get(w, {})]
        if bad:
            raise DataError(f"{len(bad)} record(s) lack what reward {self.name!r} compares against",
                            fix="give every record an \"answer\" (or choose a reward that needs none)", problems=bad)

    def __call__(self, where: list[str], texts: list[str]) -> list[float]:
        """The reward of each reply `texts[i]` to the record `where[i]`."""
        if self.model is not None:
            items = [(prompt_of(self.records[w]), t) for w, t in zip(where, texts, strict=True)]
            return rewards_of(self.model, self.tokenizer, items)
        out = []
        for w, t in zip(where, texts, strict=True):
            v = REWARDS[self.name].fn(t, self.records[w])
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise TunelabError(f"reward {self.name!r} returned {v!r} for {w}",
                                   fix="a reward returns a finite number")
            out.append(float(v))
        return out


def compare(mine: list[float], reference: list[float]) -> dict[str, float]:
    """Evaluation: the mean reward of the policy's replies and of the reference's to the same prompts, and
    the policy's win rate (a tie counts half)."""
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(mine, reference, strict=True))
    return {"reward": sum(mine) / len(mine), "reward_reference": sum(reference) / len(reference),
            "win_rate": wins / len(reference)}
