"""Recognise recurrent cells that exporters decompose into Loop/Scan bodies (work in progress)."""

from __future__ import annotations

import onnx_ir as ir


class RecogniseRecurrentCells:
    name = "recognise_recurrent_cells"

    def __call__(self, model: ir.Model, ctx) -> bool:
        return False
