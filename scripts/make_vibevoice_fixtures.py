#!/usr/bin/env python3
"""Record the VibeVoice reference's outputs on a tiny random checkpoint, for the parity tests.

    python scripts/make_vibevoice_fixtures.py [--venv DIR]

Creates (or reuses) a throwaway virtual environment with the reference implementation
(vibevoice==0.0.1, transformers==4.51.3, the CPU torch), never a dependency of vibecast, and
runs scripts/vibevoice_reference.py in it. Writes tests/fixtures/vibevoice/:
    tiny/                    config.json, model.safetensors (bf16), tokenizer.json
    reference.safetensors    what the reference computed (fp32)
    reference.json           the script, seeds, prompt ids and generated tokens
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "vibevoice"
PACKAGES = [
    "torch==2.13.0",
    "transformers==4.51.3",
    "diffusers==0.35.1",
    "tqdm",
    "numpy",
    "safetensors",
    "tokenizers",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--venv", default="/tmp/vibecast-vibevoice-reference", help="throwaway environment"
    )
    args = parser.parse_args()
    venv = Path(args.venv)
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run(pip + ["--upgrade", "pip"], check=True)
        subprocess.run(pip + PACKAGES, check=True)
        subprocess.run(pip + ["--no-deps", "vibevoice==0.0.1"], check=True)
    if OUT.exists():
        shutil.rmtree(OUT)
    subprocess.run(
        [str(python), str(ROOT / "scripts" / "vibevoice_reference.py"), str(OUT)], check=True
    )
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
