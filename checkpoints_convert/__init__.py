"""HuggingFace / PyTorch checkpoint conversion into moex params (and back).

The converters (`python -m checkpoints_convert SRC OUT`) are the subject of the converters issue;
this package holds them so that `moex` itself never imports torch.
"""
