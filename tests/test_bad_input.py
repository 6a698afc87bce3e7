"""The bad-input catalogue at the command line: one line naming the problem and the fix, exit code 2,
nothing left behind. (The sweep spec's own catalogue is in test_platform_spec.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dreamfusion_platform.cli import main


def _spec(tmp: Path, **fields) -> str:
    data = {"name": "bad", "prompts": ["a red ball"], "iterations": 2, **fields}
    path = tmp / f"spec{len(list(tmp.glob('spec*.yaml')))}.yaml"  # one file per case
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _write(tmp: Path, name: str, content: bytes) -> str:
    (tmp / name).write_bytes(content)
    return str(tmp / name)


RUN_CASES = [
    (["run", "a red ball", "--set", "sds.guidance_scale=nan"], "sds.guidance_scale must be a finite number"),
    (["run", "a red ball", "--set", "render.resolution=many"], "expected an integer"),
    (["run", "a red ball", "--set", "justtext"], "--set expects key=value"),
    (["run", "a red ball", "--seed", "-3"], "seed must be >= 0"),
    (["run", "a red ball", "--guidance", "stable-diffusion"], "needs a model"),
    (["run", "a red ball", "--guidance", "deepfloyd-if", "--model", "/no/such/weights"], "does not exist"),
    (["run", "x" * 5000], "5000 characters"),
    (["run", "a red\nball"], "control characters"),
    (["run", "a red ball", "--set", "device=tpu"], "is not a device"),
    (["run", "a red ball", "--set", "sds.t_min=0.9", "--set", "sds.t_max=0.5"], "must be < sds.t_max"),
]


@pytest.mark.parametrize(("args", "fragment"), RUN_CASES, ids=[c[1] for c in RUN_CASES])
def test_run_rejects(args, fragment, tmp_path, capsys):
    out = tmp_path / "run"
    code = main([*args, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and fragment in err[0], err
    assert err[0].startswith("dreamfusion: error:")
    assert not out.exists()


def _sweep_cases(tmp: Path) -> list[tuple[list[str], str]]:
    return [
        ([str(tmp / "missing.yaml")], "does not exist"),
        ([_write(tmp, "broken.yaml", b"name: x\nprompts: [a red ball\n")], "fix the YAML syntax"),
        ([_write(tmp, "latin1.yaml", b"name: x\nprompts: ['caf\xe9']\n")], "not UTF-8"),
        ([_spec(tmp, prompts={"file": _write(tmp, "empty.txt", b"# nothing\n\n")})], "there are no prompts"),
        ([_spec(tmp, prompts={"file": _write(tmp, "bad.txt", b"a red ball\n\xff\xfe\n")})], "not UTF-8"),
        ([_spec(tmp, prompts=["a red ball", "a red ball "])], "repeats prompt 1"),
        ([_spec(tmp, learning_rate=0.1)], "unknown field 'learning_rate'"),
        ([_spec(tmp, iterations=0)], "iterations must be >= 1"),
        ([_spec(tmp, config={"optim.lr": -0.01})], "optim.lr must be a positive number"),
        ([_spec(tmp, guidance="midjourney")], "guidance.backend must be one of"),
        ([_spec(tmp, guidance={"backend": "stable-diffusion"})], "needs a model"),
        ([_spec(tmp), "--resume"], "no sweep 'bad'"),
    ]


def test_sweep_rejects_each_case_without_leaving_anything(tmp_path, capsys):
    cases = _sweep_cases(tmp_path)
    assert len(cases) + len(RUN_CASES) >= 20
    for args, fragment in cases:
        workspace = tmp_path / "ws"
        code = main(["sweep", *args, "--workspace", str(workspace)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and fragment in err[0], (args, err)
        assert not workspace.exists(), args


def test_sweep_refuses_an_unwritable_workspace(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = main(["sweep", _spec(tmp_path), "--workspace", str(blocker / "ws")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "cannot write to --workspace" in err[0]


def test_eval_and_ui_reject_missing_inputs(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nothing")]) == 2
    assert "holds no summary.json" in capsys.readouterr().err
    assert main(["ui", "--workspace", str(tmp_path / "nothing")]) == 2
    assert "holds no MLflow store" in capsys.readouterr().err


def test_resume_refuses_a_changed_spec(tmp_path, capsys):
    workspace = tmp_path / "ws"
    state = workspace / "sweeps" / "bad"
    state.mkdir(parents=True)
    (state / "sweep.json").write_text('{"parent_run_id": "x"}')
    (state / "spec.yaml").write_text("name: bad\nprompts: [a blue cube]\n")
    code = main(["sweep", _spec(tmp_path), "--workspace", str(workspace), "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "differs from the spec" in err[0]
    assert sorted(p.name for p in state.iterdir()) == ["spec.yaml", "sweep.json"]


def test_sweep_without_the_platform_packages_names_the_install(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # as if `pip install -e .` had left the extra out
    assert main(["sweep", _spec(tmp_path), "--workspace", str(tmp_path / "ws")]) == 2
    assert "pip install -e '.[platform]'" in capsys.readouterr().err
    assert not (tmp_path / "ws").exists()
