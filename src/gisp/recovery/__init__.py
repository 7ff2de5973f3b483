"""Recovery training of an exported level (``gisp recover``): LoRA, optionally distilled from the dense model.

``config`` (:class:`RecoverConfig`, light), ``data`` (the training windows: the
calibration part of a text source, in a seeded order), ``loss`` (LM and
chunked KD loss), ``checkpoint`` (safetensors + JSON, no pickle) and ``train``
(:func:`recover`: the loop, the merge and the export writer). See
docs/recovery.md.
"""
