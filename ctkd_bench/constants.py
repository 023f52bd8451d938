"""Constants that every layer shares, in a module that imports nothing of ours (so nothing circles).

``IGNORE_INDEX``: the label of a position without a target (prompt, padding), as PyTorch's
``cross_entropy(ignore_index=-100)`` and Hugging Face's label convention.
"""

IGNORE_INDEX = -100
