#!/usr/bin/env python3
"""Record the VibeVoice-Realtime-0.5B reference's outputs on a tiny random checkpoint, for the
Realtime parity tests.

    python scripts/make_realtime_fixtures.py --reference /path/to/VibeVoice-checkout [--venv DIR]

The reference is a checkout of microsoft/VibeVoice that you provide (the fixtures were recorded
against commit e73d1e17c3754f046352014856a922f8208fb5d3); this script never downloads, installs
or copies it. It creates (or reuses) a throwaway virtual environment holding only PyPI packages
(torch==2.13.0, transformers==4.51.3, diffusers==0.35.1, accelerate, tqdm, numpy, safetensors,
tokenizers), never a dependency of vibecast, and runs scripts/realtime_reference.py in it with
the checkout first on PYTHONPATH. Writes tests/fixtures/realtime/:
    tiny/                    config.json, model.safetensors (bf16, the official key layout),
                             tokenizer.json
    voice.pt                 a voice preset made with the reference's forward passes (fp32)
    reference.safetensors    what the reference's file demo generated (fp32), two cases
    reference.json           the texts, seeds, token ids, frame counts, EOS frames, versions
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "realtime"
PACKAGES = [
    "torch==2.13.0",
    "transformers==4.51.3",
    "diffusers==0.35.1",
    "accelerate==1.6.0",  # from_pretrained(device_map="cpu"), as the demo loads on CPU
    "tqdm",
    "numpy",
    "safetensors",
    "tokenizers",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--reference",
        required=True,
        help="a checkout of microsoft/VibeVoice (the folder that holds vibevoice/)",
    )
    parser.add_argument(
        "--venv", default="/tmp/vibecast-vibevoice-reference", help="throwaway environment"
    )
    args = parser.parse_args()
    checkout = Path(args.reference).resolve()
    streaming = checkout / "vibevoice" / "modular" / "modeling_vibevoice_streaming_inference.py"
    if not streaming.is_file():
        parser.error(f"{checkout} is not a VibeVoice checkout with the Realtime model")
    venv = Path(args.venv)
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
    # A no-op when a reused environment already has them.
    subprocess.run([str(python), "-m", "pip", "install", "-q", *PACKAGES], check=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(checkout), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    if OUT.exists():
        shutil.rmtree(OUT)
    subprocess.run(
        [str(python), str(ROOT / "scripts" / "realtime_reference.py"), str(OUT)],
        check=True,
        env=env,
    )
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
