"""Import shim: tools/ is not a package; load tools/ablate_e2e.py's main for the tests."""
import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("ablate_e2e", Path(__file__).resolve().parents[1] / "tools" / "ablate_e2e.py")
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)
main = _mod.main
