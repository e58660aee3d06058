"""What the daemon is tested and measured with: fault traces, trace generators,
``perf`` imports, sample images, the load generator, a ``pageload restore``
subprocess to drive, and a real S3 server (SeaweedFS) with a fault proxy.

Nothing in the daemon core (:mod:`loader`) imports this package.
"""

from ._daemon_process import DaemonProcess, DaemonStartError
from ._fuzz import FuzzReport, fuzz_frames, run_fuzz
from ._loadgen import VERIFY_CHUNK, LoadgenError, LoadgenReport, Mismatch, ProgressFn, run_loadgen, scale_to_rate
from ._percentiles import percentiles
from ._perfimport import PerfSamples, fold_addresses, import_perf_script, parse_perf_script
from ._s3 import FaultProxy, SeaweedServer, SeaweedStartError, find_weed
from ._sample import make_sample_image
from ._tracegen import GRANULARITIES, KINDS, generate, onto_layout
from ._traces import (
    DEFAULT_PAGE_SIZE,
    FORMAT_NAME,
    FORMAT_VERSION,
    Fault,
    Trace,
    TraceError,
    TraceSummary,
    detect_form,
    format_text,
    load_trace,
    parse_text,
    save_trace,
)

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "GRANULARITIES",
    "KINDS",
    "VERIFY_CHUNK",
    "DaemonProcess",
    "DaemonStartError",
    "Fault",
    "FaultProxy",
    "FuzzReport",
    "LoadgenError",
    "LoadgenReport",
    "Mismatch",
    "PerfSamples",
    "ProgressFn",
    "Trace",
    "TraceError",
    "TraceSummary",
    "SeaweedServer",
    "SeaweedStartError",
    "detect_form",
    "find_weed",
    "fold_addresses",
    "format_text",
    "fuzz_frames",
    "generate",
    "import_perf_script",
    "load_trace",
    "make_sample_image",
    "onto_layout",
    "parse_perf_script",
    "parse_text",
    "percentiles",
    "run_fuzz",
    "run_loadgen",
    "save_trace",
    "scale_to_rate",
]
