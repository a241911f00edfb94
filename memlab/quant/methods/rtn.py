"""Round-to-nearest: the format's own quantizer, no calibration (the baseline)."""
import dataclasses
from typing import Any

from memlab.quant.methods import METHODS


@METHODS.register("rtn")
@dataclasses.dataclass(frozen=True)
class RTN:
    format: Any
    needs_calibration = False

    @property
    def name(self):
        return f"rtn-{self.format.name}"

    def quantize(self, w, stats=None):
        return self.format.quantize(w)
