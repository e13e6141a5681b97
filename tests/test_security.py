"""Security basics (docs/security.md), each on the code path a run takes.

- Model directories: safetensors only (pickle weights refused with one line naming the opt-in,
  `teacher.allow_pickle` / `train.allow_pickle`), and a model's own code (`auto_map`) is never
  run unless `trust_remote_code` is set: a marker module that would write a file is never run.
- Secrets: a full run against a loopback OpenAI-compatible teacher with a distinctive key in
  the environment leaves the key in no file of the run directory, no output and no Hub upload;
  a key given on the command line is refused and never written or echoed.
- Servers: everything distill starts listens on 127.0.0.1, and the Ray instance it starts has
  no dashboard (Ray's own gRPC ports: see docs/security.md).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fakeserver_fixture  # noqa: E402
from fakeserver import FakeServer, Reply, Request, chat_body, error_body  # noqa: E402

from distill.cli import app  # noqa: E402
from distill.config import ConfigError, PipelineConfig, TeacherConfig  # noqa: E402
from tests.conftest import micro_solution  # noqa: E402
from tests.tiny import make_tiny_lm, make_tokenizer  # noqa: E402

fake_server = fakeserver_fixture.fake_server
runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "distill"
pytestmark = pytest.mark.timeout(300)

TINY_STUDENT = ("{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1,"
                " num_attention_heads: 4, num_key_value_heads: 4, max_position_embeddings: 512,"
                " tie_word_embeddings: true}")


def _cli(*args: str, cwd: Path, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "distill.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=280)


# ------------------------------------------------------------------ model directories


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny Llama with its tokenizer, as safetensors (tests/tiny.py): seconds."""
    out = tmp_path_factory.mktemp("tiny-model")
    make_tiny_lm(out, make_tokenizer(out, ["What is 1 + 1? The answer is 2."] * 4))
    return out


def _pickle_dir(src: Path, dst: Path, *, explicit: bool = False) -> Path:
    """A copy of the model dir `src` whose weights are a pickle (`pytorch_model.bin`), or, with
    `explicit`, a pickle that config.json names (`transformers_weights`) so that transformers
    loads it even under use_safetensors=True."""
    import torch
    from safetensors.torch import load_file

    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    (dst / "model.safetensors").unlink()
    name = "adapter_model.bin" if explicit else "pytorch_model.bin"
    torch.save(state, dst / name)
    if explicit:
        cfg = json.loads((dst / "config.json").read_text())
        cfg["transformers_weights"] = name
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _teacher_project(root: Path, model: Path, **teacher: Any) -> Path:
    (root / "seeds.jsonl").write_text('{"id": "a", "question": "What is 1 + 1?", "answer": "2"}\n')
    (root / "p.j2").write_text("{{ question }}")
    extra = "".join(f", {k}: {json.dumps(v)}" for k, v in teacher.items())
    (root / "pipe.yaml").write_text(textwrap.dedent(f"""\
        name: sec
        seeds: {{path: seeds.jsonl}}
        teacher: {{backend: transformers, model: {model}, batch_size: 2{extra}}}
        generate: {{prompt: p.j2, max_tokens: 4, samples_per_prompt: 1}}
        """))
    return root / "pipe.yaml"


def test_pickle_only_teacher_is_exit_2_naming_dir_and_opt_in(tiny_model: Path,
                                                             tmp_path: Path) -> None:
    model = _pickle_dir(tiny_model, tmp_path / "pickled")
    pipe = _teacher_project(tmp_path, model)
    res = _cli("generate", str(pipe), "--run-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    line = res.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"error: teacher\.model: {re.escape(str(model))}: weights only in "
                        r"pickle format \(pytorch_model\.bin\); .* set teacher\.allow_pickle: "
                        r"true", line), line
    assert not (tmp_path / "run" / "generate" / "generations.jsonl").exists()

    # Opted in: the same directory loads (torch.load with weights_only, transformers' default).
    res = _cli("generate", str(pipe), "--run-dir", str(tmp_path / "run"),
               "--set", "teacher.allow_pickle=true", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "run" / "generate" / "generations.jsonl").is_file()


def test_pickle_named_in_config_json_is_refused_too(tiny_model: Path, tmp_path: Path) -> None:
    """`transformers_weights` in config.json makes transformers load that file whatever
    `use_safetensors` says; before this check such a teacher loaded its pickle silently."""
    from distill.teachers.transformers_backend import load_causal_lm

    model = _pickle_dir(tiny_model, tmp_path / "explicit", explicit=True)
    with pytest.raises(ConfigError, match=r"^teacher\.model: .*explicit: config\.json names "
                                          r"pickle weights \(transformers_weights: "
                                          r"adapter_model\.bin\).*teacher\.allow_pickle: true$"):
        load_causal_lm(str(model), device="cpu")
    loaded, _ = load_causal_lm(str(model), device="cpu", allow_pickle=True)
    assert loaded.num_parameters() > 0


def test_pickle_only_student_is_refused_naming_train_allow_pickle(tiny_model: Path,
                                                                  tmp_path: Path) -> None:
    from distill.train.student import build_student, load_tokenizer

    model = _pickle_dir(tiny_model, tmp_path / "student")
    (tmp_path / "extra.ckpt").write_bytes(b"not read")
    cfg = PipelineConfig.model_validate({"name": "s", "root": str(tmp_path),
                                         "seeds": {"path": "x.jsonl"},
                                         "train": {"student": str(model)}})
    tok = load_tokenizer(cfg)
    with pytest.raises(ConfigError, match=rf"^train\.student: {re.escape(str(model))}: weights "
                                          r"only in pickle format .*train\.allow_pickle: true$"):
        build_student(cfg, tok)
    cfg.train.allow_pickle = True
    assert build_student(cfg, tok).num_parameters() > 0


def test_every_pickle_suffix_is_refused(tmp_path: Path) -> None:
    from distill.teachers.transformers_backend import PICKLE_SUFFIXES, weight_options

    for suffix in (".bin", ".pt", ".pth", ".ckpt"):
        assert suffix in PICKLE_SUFFIXES
        d = tmp_path / suffix.strip(".")
        d.mkdir()
        (d / "config.json").write_text("{}")
        (d / f"model{suffix}").write_bytes(b"")
        with pytest.raises(ConfigError, match=rf"\(model\{suffix}\).*teacher\.allow_pickle"):
            weight_options(str(d), field="teacher.model", allow_pickle=False,
                           trust_remote_code=False)
        assert weight_options(str(d), field="teacher.model", allow_pickle=True,
                              trust_remote_code=False)["use_safetensors"] is None
        # Safetensors beside a pickle: the safetensors are loaded, the pickle never opened.
        (d / "model.safetensors").write_bytes(b"")
        assert weight_options(str(d), field="teacher.model", allow_pickle=False,
                              trust_remote_code=False) == {"trust_remote_code": False,
                                                           "use_safetensors": True}


MARKER_MODULE = """\
from pathlib import Path
Path({marker!r}).write_text("custom code ran")
from transformers import LlamaConfig, LlamaForCausalLM


class MarkerConfig(LlamaConfig):
    model_type = "distill_marker"


class MarkerForCausalLM(LlamaForCausalLM):
    config_class = MarkerConfig
"""


def _remote_code_dir(src: Path, dst: Path, marker: Path, model_type: str) -> Path:
    """A copy of `src` whose config.json maps the auto classes to `marker.py`, a module that
    writes `marker` when it is imported."""
    shutil.copytree(src, dst)
    (dst / "marker.py").write_text(MARKER_MODULE.format(marker=str(marker)))
    cfg = json.loads((dst / "config.json").read_text())
    cfg |= {"model_type": model_type, "architectures": ["MarkerForCausalLM"],
            "auto_map": {"AutoConfig": "marker.MarkerConfig",
                         "AutoModelForCausalLM": "marker.MarkerForCausalLM"}}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_custom_code_is_not_run_without_trust_remote_code(tiny_model: Path, tmp_path: Path
                                                          ) -> None:
    marker = tmp_path / "MARKER"
    unknown = _remote_code_dir(tiny_model, tmp_path / "unknown", marker, "distill_marker")
    known = _remote_code_dir(tiny_model, tmp_path / "known", marker, "llama")

    # An architecture transformers does not know: refused on the CLI, exit 2, naming the opt-in.
    pipe = _teacher_project(tmp_path, unknown)
    env = os.environ | {"HF_MODULES_CACHE": str(tmp_path / "modules")}
    res = _cli("generate", str(pipe), "--run-dir", str(tmp_path / "run"), cwd=tmp_path, env=env)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines()[-1] == (
        f"error: teacher.model: {unknown}: the model ships its own code (auto_map) for an "
        "architecture transformers does not know; it is not run unless "
        "teacher.trust_remote_code: true")
    # The student's side, in process: the tokenizer and the model.
    from distill.train.student import build_student, load_tokenizer

    cfg = PipelineConfig.model_validate({"name": "s", "root": str(tmp_path),
                                         "seeds": {"path": "x.jsonl"},
                                         "train": {"student": str(unknown)}})
    with pytest.raises(ConfigError, match=r"^train\.student: .*train\.trust_remote_code: true$"):
        build_student(cfg, load_tokenizer(cfg))
    # A known architecture with an auto_map: transformers' own class, the shipped code unread.
    from distill.teachers.transformers_backend import load_causal_lm

    model, _ = load_causal_lm(str(known), device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not marker.exists()

    # The marker works: with trust_remote_code the module runs (in a child, so that this
    # process never imports it).
    script = ("import sys; from distill.teachers.transformers_backend import load_causal_lm; "
              "m, _ = load_causal_lm(sys.argv[1], trust_remote_code=True, device='cpu'); "
              "print(type(m).__name__)")
    out = subprocess.run([sys.executable, "-c", script, str(unknown)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "MarkerForCausalLM", out.stderr
    assert marker.read_text() == "custom code ran"


def test_every_model_load_in_src_passes_the_safety_options() -> None:
    """Every `from_pretrained` of a model or config in src/ says `trust_remote_code` (from the
    config, else False) and `use_safetensors` (True, or the options `weight_options` gives);
    a tokenizer's says `trust_remote_code`. PEFT adapters are the run's own safetensors."""
    calls = []
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text()
        for m in re.finditer(r"(\w+)\.from_pretrained\(", text):
            depth, i = 1, m.end()
            while depth:
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            calls.append((f"{path.relative_to(SRC)}:{text[:m.start()].count(chr(10)) + 1}",
                          m.group(1), text[m.end():i - 1]))
    assert len(calls) >= 10
    for where, cls, args in calls:
        if cls == "PeftModel":
            continue
        options = "**options" in args  # weight_options: both, from the config
        assert "trust_remote_code" in args or options, where
        if cls.startswith("AutoModel"):
            assert "use_safetensors=True" in args or options, where


# ---------------------------------------------------------------------------------- secrets

SECRET = "sk-distill-SECRET-c0ffee-5e5ame-9f27d1"
HF_SECRET = "hf_distillSECRETtokenDEADBEEF0042"
KEY_ENV = "DISTILL_SECURITY_TEST_KEY"
_NUMBERS = re.compile(r"Tom has (\d+) apples and buys (\d+) more")


def _micro_teacher(req: Request) -> Reply:
    """The micro seeds' worked answers; the first request gets a 400 whose message echoes
    the Authorization header back (as careless gateways do)."""
    if req.index == 0:
        return Reply(400, error_body(f"bad request from {req.headers.get('authorization')}",
                                     type_="invalid_request_error"))
    m = _NUMBERS.search(req.prompt)
    if m is None:
        return Reply(body=chat_body(req))
    text = micro_solution({"question": f"Tom has {m[1]} apples and buys {m[2]} more."})
    return Reply(body=chat_body(req, [text] * req.n))


class _RecordingHub:
    """Stands in for `huggingface_hub.HfApi`: records every argument and uploaded byte."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.uploaded: dict[str, bytes] = {}

    def create_repo(self, **kw: Any) -> Any:
        self.calls.append(kw)
        return None

    def upload_folder(self, **kw: Any) -> None:
        self.calls.append(kw)
        folder = Path(kw["folder_path"])
        for name in kw["allow_patterns"]:
            self.uploaded[name] = (folder / name).read_bytes()


@pytest.mark.slow
def test_no_secret_reaches_any_file_output_or_upload(micro_pipeline: Path, tmp_path: Path,
                                                     fake_server: FakeServer,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    fake_server.handler = _micro_teacher
    run_dir = tmp_path / "run"
    overrides = {
        "teacher.backend": "openai", "teacher.model": "fake-model",
        "teacher.base_url": fake_server.url, "teacher.api_key_env": KEY_ENV,
        "teacher.max_concurrency": 2, "teacher.max_retries": 1,
        "train.bf16": "false", "train.epochs": 1,
        "export": "{formats: [merged], latency_prompts: 2, eval_limit: 6, fidelity_prompts: 2,"
                  " fidelity_tokens: 8}",
        "stages": "[generate, filter, train, evaluate, export]",
    }
    args = [x for k, v in overrides.items() for x in ("--set", f"{k}={v}")]
    env = os.environ | {KEY_ENV: SECRET, "HF_TOKEN": HF_SECRET, "OPENAI_LOG": "debug",
                        "DISTILL_DEBUG": "1"}
    res = _cli("run", str(micro_pipeline), "--run-dir", str(run_dir), *args,
               cwd=micro_pipeline.parent.parent, env=env)
    assert res.returncode == 0, res.stderr[-3000:]

    # The key was in play: generate and evaluate sent it on every request, and it was echoed.
    requests = fake_server.chat_requests()
    assert len(requests) >= 12 and all(r.headers["authorization"] == f"Bearer {SECRET}"
                                      for r in requests)
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    names = {str(p.relative_to(run_dir)) for p in files}
    assert {"cache.sqlite", "manifest.json", "config.yaml", "report.md", "sft/README.md",
            "student/README.md", "generate/generations.jsonl", "evaluate/metrics.json",
            "export/export.json"} <= names, sorted(names)
    assert KEY_ENV in (run_dir / "config.yaml").read_text()  # the NAME is recorded, not the key
    for secret in (SECRET, HF_SECRET):
        for p in files:
            assert secret.encode() not in p.read_bytes(), p
        assert secret not in res.stdout and secret not in res.stderr
    assert "***" in (run_dir / "generate" / "generations.jsonl").read_text()  # echo scrubbed

    # The Hub push uploads the card and data: neither key is in them or in any argument but
    # the token itself.
    from distill.hub import push_sft

    monkeypatch.setenv("HF_TOKEN", HF_SECRET)
    monkeypatch.setenv(KEY_ENV, SECRET)
    hub = _RecordingHub()
    push_sft(run_dir, "someone/micro", api=hub)
    assert "README.md" in hub.uploaded and "sft.jsonl" in hub.uploaded
    for name, data in hub.uploaded.items():
        assert SECRET.encode() not in data and HF_SECRET.encode() not in data, name
    for call in hub.calls:
        assert call.pop("token") == HF_SECRET
        assert SECRET not in repr(call) and HF_SECRET not in repr(call)


def test_a_key_on_the_command_line_is_refused_and_never_echoed(tiny_model: Path,
                                                               tmp_path: Path) -> None:
    """There is no `teacher.api_key`: the key comes from the variable `api_key_env` names. A key
    pasted into either field is exit 2 with no run directory, and the message does not repeat
    it (the card records the command line, so it must never get that far)."""
    pipe = _teacher_project(tmp_path, tiny_model)
    with open(pipe, "a") as fh:
        fh.write("stages: [generate, filter]\n")
    remote = ["--set", "teacher.backend=openai", "--set", "teacher.model=gpt-x",
              "--set", "teacher.base_url=https://api.example.com/v1"]
    for field in ("teacher.api_key", "teacher.api_key_env", "filter.judge.teacher.api_key_env"):
        run_dir = tmp_path / field
        res = runner.invoke(app, ["run", str(pipe), "--run-dir", str(run_dir), *remote,
                                  "--set", f"{field}={SECRET}"])
        assert res.exit_code == 2, res.output
        assert SECRET not in res.output
        assert field in res.output
        assert not run_dir.exists()
    with pytest.raises(ValueError) as err:
        TeacherConfig(api_key_env=SECRET)
    assert SECRET not in str(err.value)
    assert TeacherConfig(api_key_env="MY_KEY_2").api_key_env == "MY_KEY_2"
    assert TeacherConfig(api_key_env=None).api_key_env is None


# ---------------------------------------------------------------------------------- servers

# What in src/ could open a listening socket; each one found must be listed in
# docs/security.md and bound to 127.0.0.1 (or be Ray's, checked below).
_LISTENERS = re.compile(r"start_server|serve_forever|HTTPServer|TCPServer|run_app|\.listen\(|"
                        r"\.bind\(|uvicorn|ray\.init\(|launch\(")


def test_the_only_server_distill_starts_is_ray() -> None:
    found = sorted(f"{p.relative_to(SRC)}: {m.group(0)}" for p in SRC.rglob("*.py")
                   for m in _LISTENERS.finditer(p.read_text()))
    assert found == ["executor/__init__.py: ray.init("], found


def test_ray_is_started_without_a_dashboard(monkeypatch: pytest.MonkeyPatch) -> None:
    """`executor.connect` starts (or joins) Ray with the dashboard off; no dashboard host is
    ever passed, so none can be bound to another interface."""
    from distill.config import ExecutorConfig
    from distill.executor import connect

    seen: list[dict[str, Any]] = []

    class FakeRay:
        @staticmethod
        def is_initialized() -> bool:
            return False

        @staticmethod
        def init(**kw: Any) -> None:
            seen.append(kw)

    monkeypatch.setitem(sys.modules, "ray", FakeRay)
    connect(ExecutorConfig(kind="ray"))
    connect(ExecutorConfig(kind="ray", address="auto"))
    assert len(seen) == 2
    for kw in seen:
        assert kw["include_dashboard"] is False
        assert kw.get("dashboard_host", "127.0.0.1") == "127.0.0.1"


_RAY_PROBE = """
import json, os, psutil
from distill.config import ExecutorConfig
from distill.executor import connect
ray = connect(ExecutorConfig(kind="ray", local_cpus=1))
procs = []
for p in [psutil.Process(), *psutil.Process().children(recursive=True)]:
    try:
        listen = [[c.laddr.ip, c.laddr.port] for c in p.net_connections(kind="tcp")
                  if c.status == psutil.CONN_LISTEN]
        procs.append({"cmd": " ".join(p.cmdline()), "listen": listen})
    except psutil.Error:
        pass
print(json.dumps({"procs": procs, "auth": os.environ.get("RAY_AUTH_MODE")}))
ray.shutdown()
"""


@pytest.mark.slow
def test_the_local_ray_instance_has_no_dashboard_and_token_auth(tmp_path: Path) -> None:
    """Ray's head process for usage stats runs `dashboard.py --minimal` on 127.0.0.1 with no
    web frontend; nothing listens on the dashboard port (8265)."""
    pytest.importorskip("ray", reason="the `ray` extra is not installed")
    pytest.importorskip("psutil")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    out = subprocess.run([sys.executable, "-c", _RAY_PROBE], env=env, capture_output=True,
                         text=True, timeout=180, start_new_session=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    listeners = [tuple(x) for p in probe["procs"] for x in p["listen"]]
    assert listeners, probe  # the probe sees Ray's listeners at all
    assert 8265 not in {port for _, port in listeners}, listeners
    for p in probe["procs"]:
        if "dashboard/dashboard.py" in p["cmd"]:
            assert "--host=127.0.0.1" in p["cmd"] and "--minimal" in p["cmd"], p
            assert all(ip in ("127.0.0.1", "::1") for ip, _ in p["listen"]), p
    # Ray binds its gRPC servers on every interface (not configurable); what guards them is
    # the token authentication Ray enables for a new local instance, which distill keeps.
    assert probe["auth"] == "token", probe


def test_fake_teacher_server_binds_loopback(fake_server: FakeServer) -> None:
    """The loopback teacher the tests and benchmarks start (tests/fakeserver.py) listens on
    127.0.0.1 only."""
    psutil = pytest.importorskip("psutil")
    ours = [c for c in psutil.Process().net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == fake_server.port]
    assert ours and all(c.laddr.ip == "127.0.0.1" for c in ours), ours
