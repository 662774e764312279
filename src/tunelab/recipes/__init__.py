"""Recipes: compositions of the layers below (one training run, the embedded base's build, the demo,
export); the home of compare, continual, meta and search. api.py and cli.py are thin faces over them."""
