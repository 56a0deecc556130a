"""DGT (differential gradient transmission) of a party's push to the global servers.

The local server (:class:`Sender`) cuts each push into blocks, scores them by a moving average of
their mean magnitude, sends the top K fraction on the reliable TCP link and the rest over
lower-priority channels; the global server (:class:`Receiver`) reassembles each push with a short
deadline, counting what is still missing as zero and folding late blocks into the next round.
See docs/DGT.md.
"""
from .blocks import Quantizer, Scorer, assign_channels, block_elements, block_means, dequantize, quantize
from .receiver import LOW_SUFFIX, Receiver
from .sender import AdaptiveK, Sender

__all__ = ["LOW_SUFFIX", "AdaptiveK", "Quantizer", "Receiver", "Scorer", "Sender", "assign_channels", "block_elements",
           "block_means", "dequantize", "quantize"]
