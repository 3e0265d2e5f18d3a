"""Vector methods, one module each: how a category's direction is made from the model.

- `prompt`: mean-diff and pruned, from the activations of harmful and safe *prompts* (the papers'
  unsupervised vectors);
- `guided`: prompts whose answers a judge or reviewer found unsafe against those found safe (the
  papers' guided vectors);
- `answers`: from the model's own *answers*, toward the behaviour the author chooses (the default:
  measured to make steered answers safer where prompt vectors do not).

Nothing is imported here, so `vectors` can use `prompt` and `answers` while `guided` uses `vectors`.
"""
