"""The web UI's FastAPI app: pages, the JSON API, and the checks every request passes.

Pages (``/``, ``/run/ID``, ``/compare``, ``/launch``, ``/chat/ID``) are one static page that
draws itself from the JSON API (``/api/...``); a run's ID is its folder's path under the root.

Safety, in ``guard``: a token (when one is in force) from the ``Authorization: Bearer`` header,
the cookie that ``/?token=...`` sets, or nothing else; on a loopback address, a ``Host`` header
that is not loopback is refused (a page elsewhere cannot reach the UI by DNS rebinding); a POST
must be JSON (a form on another site cannot post one without the browser asking first). Every
path goes through ``runs.inside``; the only processes started are ``tuneforge`` commands
(jobs.py).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import threading
from dataclasses import fields as dataclass_fields
from pathlib import Path
from urllib.parse import urlsplit

import yaml
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool

from tuneforge.access import bearer_matches, is_loopback
from tuneforge.errors import TuneforgeError
from tuneforge.ui import runs as R
from tuneforge.ui.jobs import Busy, Jobs

STATIC = Path(__file__).parent / "static"
PAGES = ("", "run", "compare", "launch", "chat")
COOKIE = "tuneforge_token"
# the launch form: the settings most runs change (the YAML editor takes every other key)
FORM_KEYS = (
    "model",
    "output_dir",
    "method.name",
    "method.r",
    "data.train",
    "data.eval",
    "training.objective",
    "training.learning_rate",
    "training.num_epochs",
    "training.max_steps",
    "training.batch_size",
    "training.eval_steps",
    "training.save_steps",
    "training.seed",
)
NEW_CONFIG = """\
model: smollm2-135m-instruct
output_dir: {runs}/my-run
method:
  name: lora
  r: 16
data:
  train: data/train.jsonl
  eval: data/eval.jsonl
training:
  learning_rate: 0.0002
  num_epochs: 3
"""


class NotFound(TuneforgeError):
    pass


def about(key: str, check, *args):
    """``check(*args)``; its ``TuneforgeError`` is about config key ``key`` (the page shows
    the line beside that field)."""
    try:
        return check(*args)
    except TuneforgeError as e:
        e.key = e.key or key
        raise


def output_override(path: Path) -> str:
    """``output_dir=PATH`` as an override whose value YAML reads back whole ("runs/exp #2")."""
    return f"output_dir={json.dumps(str(path))}"


def error_line(message: str) -> int | None:
    found = re.match(r"[^:]*:(\d+): ", message)
    return int(found.group(1)) if found else None


def form_fields() -> list[dict]:
    """The launch form's fields: key, default, help and choices, from the config's own schema."""
    from tuneforge import config as C

    out = []
    for key in FORM_KEYS:
        section, _, name = key.rpartition(".")
        cls = C.SECTIONS[section] if section else C.Config
        f = next(f for f in dataclass_fields(cls) if f.name == name)
        choices = f.metadata.get("choices")
        if key == "method.name":
            choices = C.METHODS
        elif key == "training.objective":
            choices = C.OBJECTIVES
        out.append(
            {
                "key": key,
                "help": f.metadata.get("help", ""),
                "choices": list(choices) if choices else None,
            }
        )
    return out


def set_keys(text: str, values: dict) -> str:
    """The YAML ``text`` with dotted ``values`` set, each read as a ``key=value`` override is
    (config.parse_overrides); an empty value removes the key."""
    from tuneforge.config import parse_overrides

    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError:
        raise TuneforgeError("config.yaml: fix the YAML first (invalid YAML)") from None
    if not isinstance(data, dict):
        raise TuneforgeError("config.yaml:1: a config must be a mapping of keys to values")
    if isinstance(data.get("method"), str):  # `method: lora` is short for {name: lora}
        data["method"] = {"name": data["method"]}
    given = {k: v for k, v in values.items() if v is not None and str(v).strip()}
    merge(data, parse_overrides([f"{k}={v}" for k, v in given.items()]))
    for key in set(values) - set(given):
        *sections, name = str(key).split(".")
        node = data
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(name, None)
    return yaml.safe_dump(data, sort_keys=False)


def merge(into: dict, new: dict) -> None:
    """``new``'s keys into ``into``, section by section."""
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value


def code_settings(t) -> list[tuple[str, str]]:
    """(key, spec) of the settings that name Python code to run (PPO / GRPO rewards)."""
    out = [("training.reward_function", t.reward_function)] if t.reward_function else []
    return out + [(f"training.reward_functions[{i}]", f) for i, f in enumerate(t.reward_functions)]


def check_records(cfg, path: Path) -> None:
    """Read ``path`` and turn each record into what ``training.objective`` trains on, with
    training's own converter: the first bad record raises its one-line error."""
    from tuneforge.data.io import read_records
    from tuneforge.data.pipeline import record_converter

    convert = record_converter(cfg.data, cfg.training.objective)
    for record in read_records(path):
        convert(record)


class UI:
    """The state behind the app: the root, the jobs, the loaded chat model."""

    def __init__(self, root: Path, cwd: Path):
        self.root = root.resolve()
        self.cwd = cwd.resolve()
        self.jobs = Jobs(self.root, self.cwd)
        self.checked: set[tuple] = set()  # data files (and versions) that passed check_records
        self.chat_lock = threading.Lock()
        self.chat_key: tuple | None = None
        self.engine = None
        self.own_adapter: str | None = None

    # -- paths --------------------------------------------------------------------------------
    def run_dir(self, run_id: str) -> Path:
        path = R.inside(self.root, run_id)
        if not R.is_run_folder(path):
            raise NotFound(f"no run '{run_id}' under the runs folder")
        return path

    def run_id(self, raw: str) -> str:
        """The one name of a run folder ('a/b' for 'a/b/', 'a//b', 'a/./b'): jobs are keyed by it."""
        return R.inside(self.root, raw).relative_to(self.root).as_posix()

    def user_path(self, value: str, key: str, roots: tuple[Path, ...]) -> Path:
        """A path a config names (relative to the UI's working folder), if under ``roots``."""
        path = (self.cwd / value).resolve()
        if not any(path.is_relative_to(r) for r in roots):
            where = " or ".join(str(r) for r in roots)
            raise R.PathRefused(
                f"config.yaml: '{key}' {value} is outside {where}; the UI reads and writes "
                "only there",
                key,
            )
        return path

    # -- launch -------------------------------------------------------------------------------
    def check(self, text: str) -> tuple[object, Path]:
        """What ``tuneforge train`` checks before it starts, on the editor's text: the config,
        the run folder, the data files (records in the objective's format), the model
        reference; and what the UI itself refuses: any path outside its folders, code from
        outside them. Returns (config, run folder)."""
        from tuneforge.config import config_from_text
        from tuneforge.models import ALIASES, resolve_model
        from tuneforge.train.reward_functions import BUILTINS
        from tuneforge.train.run import check_run_dir

        cfg = config_from_text(text, "config.yaml")
        if cfg.sweep.params:
            raise TuneforgeError("config.yaml: the UI launches one run; remove the sweep section")
        out = self.user_path(cfg.output_dir, "output_dir", (self.root,))
        if out == self.root or out.is_relative_to(self.root / R.UI_DIR):
            raise R.PathRefused(
                f"config.yaml: 'output_dir' must name a folder inside {self.root}", "output_dir"
            )
        about("output_dir", check_run_dir, out, False, False)
        if cfg.trust_remote_code:
            raise TuneforgeError(
                "config.yaml: 'trust_remote_code' runs code from the model folder; the UI does "
                "not launch that (use tuneforge train)",
                "trust_remote_code",
            )
        mine = (self.root, self.cwd)
        t, d = cfg.training, cfg.data
        for key, spec in code_settings(t):
            if spec.split(":", 1)[0] in BUILTINS:
                continue
            file = spec.rsplit(":", 1)[0]
            if not file.endswith(".py"):
                raise TuneforgeError(
                    f"config.yaml: '{key}' {spec}: the UI runs reward code only from a "
                    "file.py:function in its folders, not an importable module",
                    key,
                )
            self.user_path(file, key, mine)
        paths = [("data.eval", d.eval), ("eval.data", cfg.eval.data)]
        paths += [
            (f"data.mix[{i}].path", m.get("path")) for i, m in enumerate(d.mix) if m.get("path")
        ]
        if t.reward_model:
            paths.append(("training.reward_model", t.reward_model))
        if cfg.eval.general_text not in ("builtin", "none"):
            paths.append(("eval.general_text", cfg.eval.general_text))
        if cfg.model not in ALIASES and Path(cfg.model).expanduser().exists():
            paths.append(("model", cfg.model))
        for key, value in [("data.train", d.train), *paths]:
            if value:
                self.user_path(value, key, mine)
        self.check_records(cfg, "data.train", d.train)
        if d.eval:
            self.check_records(cfg, "data.eval", d.eval)
        about("model", resolve_model, cfg.model)
        return cfg, out

    def check_records(self, cfg, key: str, value: str) -> None:
        """Every record of a data file reads as the objective's records (train's own
        converters), remembered per file version: the editor checks on every pause."""
        path = self.user_path(value, key, (self.root, self.cwd))
        try:
            st = path.stat()
            version = (str(path), st.st_mtime_ns, st.st_size, cfg.training.objective,
                       cfg.data.format, cfg.data.system_prompt)  # fmt: skip
        except OSError:
            version = None
        if version in self.checked:
            return
        about(key, check_records, cfg, path)
        if version is not None:
            self.checked.add(version)

    def launch(self, text: str) -> dict:
        cfg, out = self.check(text)
        run_id = out.relative_to(self.root).as_posix()
        configs = self.root / R.UI_DIR / "configs"
        configs.mkdir(parents=True, exist_ok=True)
        path = configs / f"{run_id.replace('/', '__')}.yaml"
        path.write_text(text)
        return self.jobs.start("train", run_id, ["train", str(path), output_override(out)])

    # -- chat ---------------------------------------------------------------------------------
    def load_chat(self, run: Path):
        """The run's model for chat (one at a time; loading another, or the same run after its
        weights changed, replaces it and frees the old one)."""
        from tuneforge.infer.runs import is_run, load_with_adapters
        from tuneforge.infer.serve import Engine, _model_max_context

        if not is_run(run):
            raise TuneforgeError(f"'{run.name}' has no trained weights yet (did it finish?)")
        weights = max((p.stat().st_mtime_ns for p in run.glob("*/*.safetensors")), default=0)
        with self.chat_lock:
            if self.chat_key != (run, weights):
                if self.engine is not None:
                    self.engine.close()
                self.engine = None
                model, tok, base_name, names, own = load_with_adapters(str(run))
                self.engine = Engine(model, tok, base_name, names, _model_max_context(model))
                self.own_adapter, self.chat_key = own, (run, weights)
            return self.engine, self.own_adapter

    async def chat(self, run: Path, body: dict) -> dict:
        """One reply, through serve's engine: the run's chat template, greedy unless
        ``temperature`` is set, ``max_new_tokens`` (256) at most."""
        from tuneforge.data.render import render_prompt
        from tuneforge.infer.serve import ApiError, Job, _sampling, chat_messages

        engine, own = await run_in_threadpool(self.load_chat, run)
        base = bool(body.get("base"))
        if base and own is None:
            raise TuneforgeError("this run is a full fine-tune: it has no adapter to turn off")
        try:
            prompt = render_prompt(engine.request_tokenizer, chat_messages(body))
            request = {"max_tokens": body.get("max_new_tokens", 256), "seed": 0,
                       "temperature": body.get("temperature", 0.0)}  # fmt: skip
            sampling = _sampling(request, 256, len(prompt), engine.max_context)
            job = Job(prompt, None if base else own, sampling, asyncio.get_running_loop(),
                      asyncio.Queue())  # fmt: skip
            engine.submit(job)
        except ApiError as e:
            raise TuneforgeError(e.message) from None
        try:
            while True:
                kind, value = await job.events.get()
                if kind == "error":
                    raise TuneforgeError(f"generation failed: {value}")
                if kind == "done":
                    return {"reply": value.text, "finish_reason": value.finish_reason,
                            "model": "base" if base else (own or "fine-tuned")}  # fmt: skip
        finally:
            job.cancelled.set()


def create_app(root: Path, cwd: Path | None = None, token: str | None = None,
               loopback: bool = True, port: int | None = None) -> FastAPI:  # fmt: skip
    """The UI over ``root``. ``token``: required on every request when set; ``loopback``: the
    server listens on a loopback address only (then only loopback Host headers are served);
    ``port``: names the token's cookie (cookies are per host, not per port)."""
    ui = UI(root, cwd or Path.cwd())
    cookie_name = f"{COOKIE}_{port}" if port else COOKIE
    app = FastAPI(title="tuneforge ui", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ui = ui
    index = (STATIC / "index.html").read_text()

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if loopback:
            host = urlsplit(f"//{request.headers.get('host', '')}").hostname or ""
            if not is_loopback(host):
                return JSONResponse({"error": "this UI answers to localhost only"}, 403)
        if token is not None:
            given = request.query_params.get("token")
            if given is not None and hmac.compare_digest(given.encode(), token.encode()):
                # "/" + the path: never "//host/...", which a browser reads as another site
                response = RedirectResponse("/" + request.url.path.lstrip("/"), status_code=303)
                response.set_cookie(cookie_name, token, httponly=True, samesite="strict")
                return response
            cookie = request.cookies.get(cookie_name, "")
            ok = bearer_matches(request.headers.get("authorization"), token) or (
                hmac.compare_digest(cookie.encode(), token.encode())
            )
            if not ok:
                message = "an access token is needed: open the address `tuneforge ui` printed"
                if request.url.path.startswith("/api/"):
                    return JSONResponse({"error": message}, 401)
                return HTMLResponse(f"<!doctype html><title>tuneforge</title><p>{message}</p>", 401)
        if request.method == "POST":
            kind = request.headers.get("content-type", "").split(";")[0].strip()
            if kind != "application/json":
                return JSONResponse({"error": "send JSON (Content-Type: application/json)"}, 415)
        return await call_next(request)

    @app.exception_handler(TuneforgeError)
    async def user_error(request: Request, e: TuneforgeError):
        status = 403 if isinstance(e, R.PathRefused) else 404 if isinstance(e, NotFound) else (
            409 if isinstance(e, Busy) else 400)  # fmt: skip
        message = str(e)
        return JSONResponse({"error": message, "field": e.key, "line": error_line(message)}, status)

    async def json_body(request: Request) -> dict:
        try:
            body = await request.json()
        except ValueError:
            raise TuneforgeError("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise TuneforgeError("the request body must be a JSON object")
        return body

    @app.get("/static/{name}")
    async def static(name: str):
        path = (STATIC / name).resolve()
        if path.parent != STATIC.resolve() or not path.is_file():
            return JSONResponse({"error": "not found"}, 404)
        return FileResponse(path)

    @app.get("/files/{rel:path}")
    async def files(rel: str):
        """A file of a run (its report and the report's pictures)."""
        path = R.inside(ui.root, rel)
        if not path.is_file() or path.is_relative_to(ui.root / R.UI_DIR):
            raise NotFound(f"no file '{rel}'")
        # a run folder's HTML (the eval report) is shown, never run with the UI's rights
        headers = {"Content-Security-Policy": "sandbox", "X-Content-Type-Options": "nosniff"}
        return FileResponse(path, headers=headers)

    # -- the API ------------------------------------------------------------------------------
    @app.get("/api/runs")
    async def api_runs():
        runs = [R.run_row(ui.root, run) for run in R.find_runs(ui.root)]
        known = {r["id"] for r in runs}
        for job in ui.jobs.all():  # launched, still loading: no run folder yet
            if job["running"] and job["kind"] == "train" and job["run"] not in known:
                runs.insert(0, {"id": job["run"], "status": "starting", "started": job["started"]})
                known.add(job["run"])
        return {"root": str(ui.root), "runs": runs}

    @app.get("/api/run/{run_id:path}")
    async def api_run(run_id: str):
        run_id = ui.run_id(run_id)
        path = ui.root / run_id
        jobs = ui.jobs.for_run(run_id)
        if not R.is_run_folder(path):
            if not jobs:
                raise NotFound(f"no run '{run_id}' under the runs folder")
            code = jobs[0]["returncode"]
            state = "starting" if jobs[0]["running"] else "ended" if code == 0 else "crashed"
            detail = {"id": run_id, "status": state}
        else:
            detail = R.run_detail(ui.root, path)
        detail["jobs"] = jobs
        detail["log"] = R.tail(ui.root / jobs[0]["log"]) if jobs else ""
        if jobs and jobs[0]["running"] and detail["status"] not in ("running", "starting"):
            detail["status"] = "running"  # an eval job
        return detail

    @app.get("/api/metrics/{run_id:path}")
    async def api_metrics(run_id: str, since: int = 0):
        path = R.inside(ui.root, run_id)
        records, next_line = R.read_metrics(path, max(0, since))
        if since > next_line:  # the file was cut back (a resume from a checkpoint): start over
            records, next_line = R.read_metrics(path, 0)
            return {"records": records, "next": next_line, "reset": True}
        return {"records": records, "next": next_line, "reset": False}

    @app.get("/api/compare")
    async def api_compare(request: Request):
        ids = [ui.run_id(i) for i in request.query_params.getlist("run")]
        if len(ids) < 2:
            raise TuneforgeError("pick at least two runs to compare")
        paths = [ui.run_dir(i) for i in ids]
        result = R.compare(ui.root, paths)
        result["curves"] = {i: R.read_metrics(p)[0] for i, p in zip(ids, paths, strict=True)}
        return result

    @app.get("/api/form")
    async def api_form():
        rel = (
            Path(ui.root).relative_to(ui.cwd).as_posix()
            if ui.root.is_relative_to(ui.cwd)
            else str(ui.root)
        )
        return {"fields": form_fields(), "template": NEW_CONFIG.format(runs=rel)}

    @app.post("/api/form")
    async def api_form_set(request: Request):
        body = await json_body(request)
        values = body.get("set")
        if not isinstance(values, dict):
            raise TuneforgeError("'set' must map config keys to values")
        return {"yaml": set_keys(str(body.get("yaml", "")), values)}

    @app.post("/api/parse")
    async def api_parse(request: Request):
        """The editor's YAML as dotted keys, for the form (null while the YAML does not parse)."""
        body = await json_body(request)
        try:
            data = yaml.safe_load(str(body.get("yaml", ""))) or {}
        except yaml.YAMLError:
            return {"values": None}
        if not isinstance(data, dict):
            return {"values": None}
        if isinstance(data.get("method"), str):
            data["method"] = {"name": data["method"]}
        return {"values": R.flatten(data)}

    @app.post("/api/validate")
    async def api_validate(request: Request):
        body = await json_body(request)
        cfg, out = await run_in_threadpool(ui.check, str(body.get("yaml", "")))
        return {"ok": True, "run": out.relative_to(ui.root).as_posix()}

    @app.post("/api/launch")
    async def api_launch(request: Request):
        body = await json_body(request)
        return await run_in_threadpool(ui.launch, str(body.get("yaml", "")))

    @app.post("/api/stop/{run_id:path}")
    async def api_stop(run_id: str):
        run_id = ui.run_id(run_id)
        return {"stopped": ui.jobs.stop(run_id, ui.root / run_id)}

    @app.post("/api/resume/{run_id:path}")
    async def api_resume(run_id: str):
        run_id = ui.run_id(run_id)
        path = ui.run_dir(run_id)
        from tuneforge.train.run import check_run_dir

        check_run_dir(path, resume=True, overwrite=False)
        if R.run_status.status(path) == R.run_status.RUNNING:
            raise Busy(f"'{run_id}' is running")
        args = ["train", str(path / "config.yaml"), output_override(path), "--resume"]
        return ui.jobs.start("resume", run_id, args)

    @app.post("/api/evaluate/{run_id:path}")
    async def api_evaluate(run_id: str):
        run_id = ui.run_id(run_id)
        path = ui.run_dir(run_id)
        from tuneforge.infer.runs import is_run

        if not is_run(path):
            raise TuneforgeError(f"'{run_id}' has no trained weights yet; evaluate it when it ends")
        return ui.jobs.start("eval", run_id, ["eval", str(path)])

    @app.post("/api/chat/{run_id:path}")
    async def api_chat(run_id: str, request: Request):
        return await ui.chat(ui.run_dir(ui.run_id(run_id)), await json_body(request))

    # -- pages (last: the catch-all must not shadow the routes above) --------------------------
    @app.get("/", response_class=HTMLResponse)
    @app.get("/{page}", response_class=HTMLResponse)
    @app.get("/{page}/{rest:path}", response_class=HTMLResponse)
    async def page(page: str = "", rest: str = ""):
        if page not in PAGES:
            return HTMLResponse("<!doctype html><title>tuneforge</title><p>no such page</p>", 404)
        return HTMLResponse(index)

    return app
