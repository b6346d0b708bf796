"""Recipes: how a run is described and checked before anything is read.

`arguments` holds the argument groups (model, tokenizer, data, QA, LoRA, training), `recipe` parses a YAML recipe plus
flags into a `Recipe` of named groups, `rules` holds every range rule (`RULES`) that the command line and the Python
API both apply, `help` prints `--help`; `default_recipe.yaml` is the default run (package data). May import only
`lmpipe.errors`: everything else reads recipes, so this package reads nothing of theirs.
"""
