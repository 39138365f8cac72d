"""Bad input on the command line: one readable line on stderr, the right exit code (2 for usage
errors, 1 for the rest), never a traceback, nothing half-written; ``--debug`` shows the traceback.

Cases already covered next to their commands are not repeated here (test_runtime: sample -n 0,
.jpg, --batch-size -1, --out a folder, missing export; test_training: missing MNIST, --epochs 0,
--arch rnn, missing recipe; test_views, test_evaluate --k 0, test_bench, test_export --formats).
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vae_deploy.cli import main
from vae_deploy.errors import CheckpointError


class _Evil:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


@pytest.fixture(scope="module")
def files(mlp_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real good and bad inputs, made once: an export, a run, garbage, a malicious pickle, ..."""
    from vae_deploy.export import export

    root = tmp_path_factory.mktemp("cli")
    run = shutil.copytree(mlp_checkpoint.parent, root / "run")  # tests must not touch the shared run
    exp = export(mlp_checkpoint, root / "exp", formats=("onnx",), verify=False, log=lambda _: None).out_dir
    tampered = shutil.copytree(exp, root / "tampered")
    blob = bytearray((tampered / "decoder.onnx").read_bytes())
    blob[len(blob) // 2] ^= 0x01
    (tampered / "decoder.onnx").write_bytes(bytes(blob))
    garbled = shutil.copytree(exp, root / "garbled")
    (garbled / "manifest.json").write_text("{ not json")
    (root / "empty").mkdir()
    (root / "afile").write_text("a file where a folder is expected")
    (root / "garbage.pt").write_bytes(b"this is not a checkpoint\n" * 10)
    data = mlp_checkpoint.read_bytes()
    (root / "truncated.pt").write_bytes(data[: len(data) // 2])
    torch.save({"format": "vae-deploy-checkpoint", "state_dict": _Evil(str(root / "pwned"))}, root / "evil.pt")
    (root / "evil.pkl").write_bytes(pickle.dumps({"x": _Evil(str(root / "pwned"))}))
    state = torch.load(mlp_checkpoint, weights_only=True)
    state["format_version"] = 42
    torch.save(state, root / "future.pt")
    state = torch.load(mlp_checkpoint, weights_only=True)
    state["state_dict"] = {k: torch.zeros(2, 2) for k in state["state_dict"]}
    torch.save(state, root / "shapes.pt")
    (root / "bad.toml").write_text("[model\nlatent_dim = ")
    (root / "unknown.toml").write_text("[model]\nlatent_dim = 4\nwidth = 9\n")
    (root / "table.toml").write_text("[optimizer]\nlr = 1\n")
    (root / "type.toml").write_text('[model]\nlatent_dim = "eight"\n')
    readonly = root / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    return {
        "root": root,
        "ckpt": mlp_checkpoint,
        "run": run,
        "exp": exp,
        "tampered": tampered,
        "garbled": garbled,
        "empty": root / "empty",
        "afile": root / "afile",
        "readonly": readonly,
        "missing": root / "missing",
        **{p.stem: p for p in root.glob("*.pt")},
        "evil.pkl": root / "evil.pkl",
        **{p.stem + ".toml": p for p in root.glob("*.toml")},
    }


def _fill(args: list[str], files: dict[str, Path], out: Path) -> list[str]:
    return [a.format(out=out, **{k.replace(".", "_"): v for k, v in files.items()}) for a in args]


S = ["sample", "{exp}", "--provider", "cpu"]
CASES = {
    # sample -----------------------------------------------------------------------------------
    "sample: negative n": (
        [*S, "-n", "-1", "--out", "{out}/s.png"],
        2,
        "n must be a positive integer, got -1",
    ),
    "sample: huge n": ([*S, "-n", str(10**12), "--out", "{out}/s.png"], 2, "--out-dir"),
    "sample: n not a number": (
        [*S, "-n", "many", "--out", "{out}/s.png"],
        2,
        "'many' is not a valid integer",
    ),
    "sample: no extension": ([*S, "--out", "{out}/samples"], 2, "must end in .png or .npy"),
    "sample: negative seed": ([*S, "--seed", "-3", "--out", "{out}/s.png"], 2, "--seed"),
    "sample: nrow 0": ([*S, "--nrow", "0", "--out", "{out}/s.png"], 2, "nrow must be a positive integer"),
    "sample: unknown provider": ([*S, "--provider", "tpu", "--out", "{out}/s.png"], 2, "'tpu' is not one of"),
    "sample: --out inside a file": ([*S, "-n", "2", "--out", "{afile}/s.png"], 1, "afile"),
    "sample: --out in a read-only folder": (
        [*S, "-n", "2", "--out", "{readonly}/s.png"],
        1,
        "ermission denied",
    ),
    "sample: folder without manifest": (["sample", "{empty}", "--out", "{out}/s.png"], 1, "no manifest.json"),
    "sample: export dir is a file": (["sample", "{afile}", "--out", "{out}/s.png"], 2, "is a file"),
    "sample: tampered export": (["sample", "{tampered}", "--out", "{out}/s.png"], 1, "decoder.onnx in"),
    # export -----------------------------------------------------------------------------------
    "export: missing checkpoint": (["export", "{missing}", "--out", "{out}/e"], 1, "checkpoint not found"),
    "export: garbage checkpoint": (
        ["export", "{garbage}", "--out", "{out}/e"],
        1,
        "not a readable torch checkpoint",
    ),
    "export: truncated checkpoint": (
        ["export", "{truncated}", "--out", "{out}/e"],
        1,
        "not a readable torch",
    ),
    "export: malicious pickle (torch zip)": (["export", "{evil}", "--out", "{out}/e"], 1, "refused to load"),
    "export: malicious pickle (raw)": (["export", "{evil_pkl}", "--out", "{out}/e"], 1, "refused to load"),
    "export: future checkpoint format": (["export", "{future}", "--out", "{out}/e"], 1, "newer than this"),
    "export: weights of the wrong shape": (["export", "{shapes}", "--out", "{out}/e"], 1, "has shape [2, 2]"),
    "export: checkpoint is a folder": (["export", "{run}", "--out", "{out}/e"], 2, "is a directory"),
    "export: out is a file": (["export", "{ckpt}", "--out", "{afile}"], 1, "it exists and is not a folder"),
    "export: out inside a file": (["export", "{ckpt}", "--out", "{afile}/e"], 1, "cannot write"),
    "export: out is someone's folder": (["export", "{ckpt}", "--out", "{run}"], 1, "it is a vae-deploy run folder"),
    "export: opset too old": (["export", "{ckpt}", "--out", "{out}/e", "--opset", "3"], 2, "opset must be"),
    "export: opset not a number": (["export", "{ckpt}", "--out", "{out}/e", "--opset", "x"], 2, "--opset"),
    "export: fp16 without onnx": (
        ["export", "{ckpt}", "--out", "{out}/e", "--formats", "pt2", "--fp16"],
        2,
        "needs the onnx format",
    ),
    # verify -----------------------------------------------------------------------------------
    "verify: missing folder": (["verify", "{missing}"], 1, "export folder not found"),
    "verify: folder without manifest": (["verify", "{empty}"], 1, "no manifest.json"),
    "verify: a run folder": (["verify", "{run}"], 1, "not a vae-deploy export folder"),
    "verify: garbage manifest": (["verify", "{garbled}"], 1, "not valid JSON"),
    "verify: tampered file": (["verify", "{tampered}"], 1, "decoder.onnx in"),
    "verify: folder is a file": (["verify", "{afile}"], 2, "is a file"),
    "verify: batch sizes 0": (["verify", "{exp}", "--batch-sizes", "0"], 2, "positive integers"),
    "verify: batch sizes text": (["verify", "{exp}", "--batch-sizes", "a,b"], 2, "comma-separated integers"),
    "verify: garbage reference": (
        ["verify", "{exp}", "--checkpoint", "{garbage}"],
        1,
        "not a readable torch",
    ),
    "verify: malicious reference": (["verify", "{exp}", "--checkpoint", "{evil}"], 1, "refused to load"),
    "verify: --json inside a file": (["verify", "{exp}", "--json", "{afile}/r.json"], 1, "afile"),
    # train ------------------------------------------------------------------------------------
    "train: bad TOML": (["train", "--recipe", "{bad_toml}", "--out", "{out}/r"], 2, "is not valid TOML"),
    "train: unknown recipe key": (
        ["train", "--recipe", "{unknown_toml}", "--out", "{out}/r"],
        2,
        "['width']",
    ),
    "train: unknown recipe table": (
        ["train", "--recipe", "{table_toml}", "--out", "{out}/r"],
        2,
        "unknown table",
    ),
    "train: recipe value of the wrong type": (
        ["train", "--recipe", "{type_toml}", "--out", "{out}/r"],
        2,
        "bad value in [model]",
    ),
    "train: resume with nothing to resume": (
        ["train", "--dataset", "synthetic", "--out", "{out}/r", "--resume"],
        1,
        "--resume: no checkpoint",
    ),
    "train: existing run without --resume": (
        ["train", "--dataset", "synthetic", "--out", "{run}"],
        2,
        "pass --resume to continue it",
    ),
    "train: resume with another architecture": (
        ["train", "--dataset", "synthetic", "--out", "{run}", "--latent-dim", "3", "--resume"],
        2,
        "different model config",
    ),
    "train: negative learning rate": (["train", "--lr", "-1", "--out", "{out}/r"], 2, "lr must be positive"),
    "train: hidden sizes text": (
        ["train", "--hidden", "wide", "--out", "{out}/r"],
        2,
        "comma-separated integers",
    ),
    "train: zero latent size": (
        ["train", "--latent-dim", "0", "--out", "{out}/r"],
        2,
        "latent_dim must be a positive integer",
    ),
    "train: out inside a file": (
        ["train", "--dataset", "synthetic", "--max-steps", "1", "--out", "{afile}/r"],
        1,
        "afile",
    ),
    # views / evaluate -------------------------------------------------------------------------
    "reconstruct: missing dataset": (
        ["reconstruct", "{ckpt}", "--dataset", "mnist", "--data-root", "{missing}", "--out", "{out}/r.png"],
        1,
        "mnist not found",
    ),
    "evaluate: missing dataset": (
        ["evaluate", "{ckpt}", "--dataset", "mnist", "--data-root", "{missing}"],
        1,
        "mnist not found",
    ),
    "evaluate: garbage checkpoint": (["evaluate", "{garbage}"], 1, "not a readable torch checkpoint"),
    "evaluate: malicious checkpoint": (["evaluate", "{evil}"], 1, "refused to load"),
    "evaluate: limit 0": (["evaluate", "{ckpt}", "--dataset", "synthetic", "--limit", "0"], 2, "positive"),
    "evaluate: --json inside a file": (
        [
            "evaluate",
            "{ckpt}",
            "--dataset",
            "synthetic",
            "--k",
            "2",
            "--limit",
            "8",
            "--json",
            "{afile}/e.json",
        ],
        1,
        "afile",
    ),
    "vary: n 0": (
        ["vary", "{exp}", "--dataset", "synthetic", "-n", "0", "--out", "{out}/v.png"],
        2,
        "n must be",
    ),
    "interpolate: one step": (
        ["interpolate", "{exp}", "--dataset", "synthetic", "--steps", "1", "--out", "{out}/i.png"],
        2,
        "steps must be at least 2",
    ),
    "reconstruct: garbage checkpoint": (
        ["reconstruct", "{garbage}", "--out", "{out}/r.png"],
        1,
        "not a readable",
    ),
    "reconstruct: out inside a file": (
        ["reconstruct", "{exp}", "--dataset", "synthetic", "--out", "{afile}/r.png"],
        1,
        "afile",
    ),
    "latent-map: grid -1": (
        ["latent-map", "{exp}", "--dataset", "synthetic", "--grid", "-1", "--out", "{out}/l.png"],
        2,
        "grid must be a positive integer",
    ),
    "bench: tampered export": (["bench", "{tampered}", "--quick"], 1, "decoder.onnx in"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_the_right_exit_code(
    case: str, files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args, code, expected = CASES[case]
    if "read-only" in case and os.geteuid() == 0:
        pytest.skip("root ignores folder permissions")
    out = tmp_path / "out"
    out.mkdir()
    before = sorted(p.name for p in files["root"].iterdir())
    assert main(_fill(args, files, out)) == code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert expected in err, err
    assert "Traceback" not in err and "internal error" not in err
    assert list(out.iterdir()) == []  # nothing half-written
    assert sorted(p.name for p in files["root"].iterdir()) == before  # nor beside the inputs
    assert not (files["root"] / "pwned").exists()  # and no foreign code ran


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux")
def test_unwritable_filesystem_is_one_line(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """Even as root some places cannot be written: /proc refuses new files."""
    assert main(["sample", str(files["exp"]), "-n", "2", "--provider", "cpu", "--out", "/proc/s.png"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "/proc" in err, err


def test_debug_shows_the_traceback(files: dict[str, Path]) -> None:
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        main(["--debug", "export", str(files["garbage"]), "--out", str(files["root"] / "never")])
    with pytest.raises(OSError):
        main(["--debug", "sample", str(files["exp"]), "-n", "1", "--out", str(files["afile"] / "s.png")])
    assert not (files["root"] / "never").exists()


def _console_script() -> Path:
    script = Path(sys.executable).parent / "vae-deploy"
    if not script.is_file():
        pytest.skip("the vae-deploy console script is not installed next to this Python")
    return script


@pytest.mark.parametrize(
    ("args", "code", "expected"),
    [
        (["export", "{evil}", "--out", "{root}/e"], 1, "refused to load"),
        (["sample", "{exp}", "-n", "-5", "--out", "{root}/s.png"], 2, "n must be a positive integer"),
    ],
)
def test_console_script_errors_are_one_line(files: dict[str, Path], args: list[str], code: int, expected: str):
    """The installed `vae-deploy` entry point, in a real process."""
    cmd = [str(_console_script()), *_fill(args, files, files["root"])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and expected in proc.stderr
    assert "Traceback" not in proc.stderr and not (files["root"] / "pwned").exists()


def test_console_script_debug_prints_the_traceback(files: dict[str, Path]) -> None:
    cmd = [
        str(_console_script()),
        "--debug",
        "export",
        str(files["garbage"]),
        "--out",
        str(files["root"] / "e"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr
    assert "CheckpointError: " in proc.stderr and "not a readable torch checkpoint" in proc.stderr
