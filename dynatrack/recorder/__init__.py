"""Recording activation patterns during training (the Lightning callback)."""

from dynatrack.recorder.callback import PatternRecorder, RecorderError
from dynatrack.recorder.capture import RELU_FAMILY, LayerSelectionError, pack_bits, select_layers
from dynatrack.recorder.data import IndexedDataset
from dynatrack.recorder.probe import Probe, ProbeError, ProbeSplit

__all__ = [
    "IndexedDataset",
    "LayerSelectionError",
    "PatternRecorder",
    "Probe",
    "ProbeError",
    "ProbeSplit",
    "RELU_FAMILY",
    "RecorderError",
    "pack_bits",
    "select_layers",
]
