"""Run f2py on the binding file for meson, refusing any guessed kind.

f2py maps a kind it does not know to a C type it picks itself and only says
so in a `getctype:` log line; for real64 or int8 that silently corrupts data.
Any such line fails the build here.
"""
import subprocess
import sys
from pathlib import Path


def main() -> int:
    source, module, outdir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    proc = subprocess.run(
        [sys.executable, "-m", "numpy.f2py", source, "-m", module, "--lower",
         "--build-dir", str(outdir)],
        capture_output=True, text=True,
    )
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        sys.stderr.write(log)
        return proc.returncode
    guessed = [line for line in log.splitlines() if "getctype:" in line]
    if guessed:
        sys.stderr.write("f2py guessed a C type; use iso_c_binding kinds:\n")
        sys.stderr.write("\n".join(guessed) + "\n")
        return 1
    for name in (f"{module}module.c", f"{module}-f2pywrappers.f"):
        if not (outdir / name).exists():
            sys.stderr.write(f"f2py did not write {name}\n{log}")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
