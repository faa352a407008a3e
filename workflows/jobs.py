"""Job files for ``attnproc render``: parsing, validation (errors name the bad field) and sweep expansion.

A job file is YAML or JSON::

    pipeline: tiny:wan21            # a hub id, a local folder, or tiny:<family>
    pipeline_options: {dtype: float32, device: cpu}
    output: renders                 # folder, relative to the job file (CLI --out overrides)
    defaults: {steps: 2, height: 128, width: 128, frames: 9, method: dense}
    jobs:
      - {prompt: "a red fox", seed: 1, method: knobs, options: {strength: 0.25}}
    sweep:                          # prompts x methods x seeds, appended after `jobs`
      prompts: ["a red fox", "a blue bird"]
      methods: [dense, {method: knobs, options: {strength: 0.25}}]
      seeds: [0, 1]

See ``docs/interfaces.md`` for the full schema.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TOP_KEYS = ("pipeline", "pipeline_options", "output", "defaults", "jobs", "sweep", "fps")
JOB_KEYS = ("name", "prompt", "negative_prompt", "seed", "steps", "height", "width", "frames", "guidance_scale",
            "method", "options", "call")
SWEEP_KEYS = ("prompts", "methods", "seeds")
PIPELINE_OPTION_KEYS = ("dtype", "device", "seed", "variant")
DTYPES = ("float32", "float16", "bfloat16")


class JobFileError(ValueError):
    """A job file that does not follow the schema; the message names the field (``jobs[2].seed``)."""


@dataclass(frozen=True)
class Job:
    """One fully resolved render: everything that decides its output, plus a display name."""

    index: int
    name: str | None
    prompt: str
    negative_prompt: str | None
    seed: int
    steps: int | None
    height: int | None
    width: int | None
    frames: int | None
    guidance_scale: float | None
    method: str | tuple[str, ...]
    options: dict
    call: dict = field(default_factory=dict)
    where: str = field(default="", compare=False)  # where the job file defines it: "jobs[2]", "sweep[...]"

    def config(self, pipeline: str, pipeline_options: dict) -> dict:
        """What decides the output (the name and position do not)."""
        return {"pipeline": pipeline, "pipeline_options": pipeline_options, "prompt": self.prompt,
                "negative_prompt": self.negative_prompt, "seed": self.seed, "steps": self.steps,
                "height": self.height, "width": self.width, "frames": self.frames,
                "guidance_scale": self.guidance_scale,
                "method": list(self.method) if isinstance(self.method, tuple) else self.method,
                "options": self.options, "call": self.call}


@dataclass(frozen=True)
class JobFile:
    pipeline: str
    pipeline_options: dict
    output: Path | None
    fps: int
    jobs: tuple[Job, ...]
    source: Path | None = None

    def config_of(self, job: Job) -> dict:
        return job.config(self.pipeline, self.pipeline_options)

    def hash_of(self, job: Job, compare: str | None = None) -> str:
        cfg = self.config_of(job)
        if compare:
            cfg = {**cfg, "compare": compare}
        return config_hash(cfg)


def config_hash(config: dict) -> str:
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- field checks
def _fail(where: str, msg: str):
    raise JobFileError(f"{where}: {msg}")


def _check_keys(d: dict, allowed: tuple, where: str) -> None:
    unknown = [k for k in d if k not in allowed]
    if unknown:
        _fail(f"{where}.{unknown[0]}" if where else str(unknown[0]),
              f"unknown field; valid fields: {', '.join(allowed)}")


def _int(v, where, low=None, allow_none=False):
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, int) and not (isinstance(v, float) and v.is_integer()):
        _fail(where, f"must be an integer{'' if low is None else f' >= {low}'}, got {v!r}")
    v = int(v)
    if low is not None and v < low:
        _fail(where, f"must be an integer >= {low}, got {v!r}")
    return v


def _float(v, where, allow_none=True):
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        _fail(where, f"must be a number, got {v!r}")
    return float(v)


def _str(v, where, allow_none=False):
    if v is None and allow_none:
        return None
    if not isinstance(v, str):
        _fail(where, f"must be a string, got {v!r}")
    return v


def _method(v, where):
    import attnproc

    names = [v] if isinstance(v, str) else v
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        _fail(where, f"must be a method name or a list of names, got {v!r}")
    valid = [m.name for m in attnproc.methods()]
    for n in names:
        if n not in valid:
            _fail(where, f"unknown method {n!r}; registered methods: {', '.join(valid)}")
    return names[0] if isinstance(v, str) else tuple(names)


def _options(method, options, where):
    import attnproc

    if options is None:
        options = {}
    if not isinstance(options, dict):
        _fail(where, f"must be a mapping of option name to value, got {options!r}")
    try:
        attnproc.create(list(method) if isinstance(method, tuple) else method, **options)
    except (ValueError, TypeError) as e:
        _fail(where, str(e))
    return options


def _resolve_job(raw: dict, defaults: dict, index: int, where: str) -> Job:
    if not isinstance(raw, dict):
        _fail(where, f"must be a mapping with at least `prompt`, got {raw!r}")
    _check_keys(raw, JOB_KEYS, where)
    d = {**defaults, **raw}

    def at(key):  # blame the job if it set the field, else the defaults
        return f"{where}.{key}" if key in raw else f"defaults.{key}"

    if "prompt" not in d:
        _fail(f"{where}.prompt", "missing (every job needs a prompt; set it in the job or in `defaults`)")
    method = _method(d.get("method", "dense"), at("method"))
    call = d.get("call") or {}
    if not isinstance(call, dict):
        _fail(at("call"), f"must be a mapping of extra pipeline-call arguments, got {call!r}")
    for k in ("height", "width"):
        if d.get(k) is not None and _int(d[k], at(k), 8) % 8:
            _fail(at(k), f"must be a multiple of 8, got {d[k]!r}")
    prompt = _str(d["prompt"], at("prompt"))
    options = d.get("options")
    if isinstance(options, dict):
        from .preflight import PreflightError, with_call_prompt

        try:
            options = with_call_prompt(method, options, prompt)
        except PreflightError as e:
            _fail(at("options"), str(e))
    return Job(
        index=index,
        name=_str(d.get("name"), at("name"), allow_none=True),
        prompt=prompt,
        negative_prompt=_str(d.get("negative_prompt"), at("negative_prompt"), allow_none=True),
        seed=_int(d.get("seed", 0), at("seed"), 0),
        steps=_int(d.get("steps"), at("steps"), 1, allow_none=True),
        height=_int(d.get("height"), at("height"), 8, allow_none=True),
        width=_int(d.get("width"), at("width"), 8, allow_none=True),
        frames=_int(d.get("frames"), at("frames"), 1, allow_none=True),
        guidance_scale=_float(d.get("guidance_scale"), at("guidance_scale")),
        method=method,
        options=_options(method, options, at("options")),
        call=call,
        where=where,
    )


def _sweep(raw: Any, defaults: dict, start: int) -> list[Job]:
    if not isinstance(raw, dict):
        _fail("sweep", f"must be a mapping with prompts, methods and seeds, got {raw!r}")
    _check_keys(raw, SWEEP_KEYS, "sweep")
    lists = {}
    for key in SWEEP_KEYS:
        default_key = {"prompts": "prompt", "methods": "method", "seeds": "seed"}[key]
        value = raw.get(key)
        if value is None:
            value = [defaults.get(default_key, "dense" if key == "methods" else 0 if key == "seeds" else None)]
            if value == [None]:
                _fail(f"sweep.{key}", "missing (give a list, or a default in `defaults`)")
        if not isinstance(value, list) or not value:
            _fail(f"sweep.{key}", f"must be a non-empty list, got {value!r}")
        lists[key] = value
    methods = []
    for i, m in enumerate(lists["methods"]):
        where = f"sweep.methods[{i}]"
        if isinstance(m, (str, list)):
            methods.append({"method": m})
        elif isinstance(m, dict):
            _check_keys(m, ("method", "options"), where)
            if "method" not in m:
                _fail(f"{where}.method", "missing")
            methods.append(m)
        else:
            _fail(where, f"must be a method name or {{method: NAME, options: {{...}}}}, got {m!r}")
    jobs = []
    for p, prompt in enumerate(lists["prompts"]):
        for mi, m in enumerate(methods):
            for s, seed in enumerate(lists["seeds"]):
                raw_job = {"prompt": prompt, "seed": seed, **m}
                where = f"sweep[prompts[{p}], methods[{mi}], seeds[{s}]]"
                try:
                    job = _resolve_job(raw_job, defaults, start + len(jobs), where)
                except JobFileError as e:  # name the sweep list entry, not the synthetic job
                    msg = str(e).replace(f"{where}.prompt", f"sweep.prompts[{p}]").replace(
                        f"{where}.seed", f"sweep.seeds[{s}]").replace(f"{where}.method", f"sweep.methods[{mi}]").replace(
                        f"{where}.options", f"sweep.methods[{mi}].options")
                    raise JobFileError(msg) from None
                jobs.append(job)
    return jobs


def parse_jobfile(data: Any, source: Path | None = None) -> JobFile:
    """Validate a parsed job file (a dict) and expand it into jobs."""
    if not isinstance(data, dict):
        raise JobFileError(f"job file must be a mapping at the top level, got {type(data).__name__}")
    _check_keys(data, TOP_KEYS, "")
    if "pipeline" not in data:
        _fail("pipeline", "missing (a hub id, a local folder, or tiny:<family>)")
    pipeline = _str(data["pipeline"], "pipeline")
    if pipeline.startswith("tiny:"):
        from attnproc.pipelines import tiny_record

        try:
            tiny_record(pipeline[5:])
        except ValueError as e:
            _fail("pipeline", str(e))
    popts = data.get("pipeline_options") or {}
    if not isinstance(popts, dict):
        _fail("pipeline_options", f"must be a mapping, got {popts!r}")
    _check_keys(popts, PIPELINE_OPTION_KEYS, "pipeline_options")
    if "dtype" in popts and popts["dtype"] not in DTYPES:
        _fail("pipeline_options.dtype", f"must be one of {', '.join(DTYPES)}, got {popts['dtype']!r}")
    if "device" in popts:
        _str(popts["device"], "pipeline_options.device")
    if "seed" in popts:
        _int(popts["seed"], "pipeline_options.seed", 0)
    output = data.get("output")
    if output is not None:
        output = Path(_str(output, "output"))
        if source is not None and not output.is_absolute():
            output = source.parent / output
    fps = _int(data.get("fps", 8), "fps", 1)
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        _fail("defaults", f"must be a mapping, got {defaults!r}")
    _check_keys(defaults, JOB_KEYS, "defaults")
    raw_jobs = data.get("jobs") or []
    if not isinstance(raw_jobs, list):
        _fail("jobs", f"must be a list of jobs, got {raw_jobs!r}")
    jobs = [_resolve_job(j, defaults, i, f"jobs[{i}]") for i, j in enumerate(raw_jobs)]
    if data.get("sweep") is not None:
        jobs += _sweep(data["sweep"], defaults, len(jobs))
    if not jobs:
        _fail("jobs", "no jobs: give `jobs` (a list) and/or `sweep`")
    return JobFile(pipeline, dict(popts), output, fps, tuple(jobs), source)


def check_jobfile(jobfile: JobFile):
    """Check every job against its pipeline before anything renders (see :mod:`.preflight`): the method serves
    the pipeline's family, the fields fit its call. Reads the pipeline's configuration, not its weights. Errors
    name the job (``jobs[1].method: ...``). Returns the pipeline facts."""
    from .preflight import CALL_FIELDS, PreflightError, check_fields, check_method, pipeline_facts

    where = f"{jobfile.source}: " if jobfile.source else ""
    try:
        facts = pipeline_facts(jobfile.pipeline, jobfile.pipeline_options)
    except (PreflightError, ValueError) as e:
        raise JobFileError(f"{where}pipeline: {e}") from None
    checked = set()
    for job in jobfile.jobs:
        fields = {f: getattr(job, f) for f in CALL_FIELDS}
        try:
            check_fields(facts, {**fields, **{f"call.{k}": v for k, v in job.call.items()}})
        except PreflightError as e:
            raise JobFileError(f"{where}{job.where}.{e}") from None
        key = json.dumps([job.method, job.options], sort_keys=True, default=repr)
        if key not in checked:
            checked.add(key)
            try:
                check_method(facts, job.method, job.options)
            except PreflightError as e:
                raise JobFileError(f"{where}{job.where}.method: {e}") from None
    return facts


def read_yaml_or_json(path: Path, error: type[Exception], what: str):
    """The data of a YAML (``.yaml``/``.yml``) or JSON file; ``error`` names the file when it cannot be read or
    parsed (job files and fine-tuning configs share this)."""
    yaml_file = path.suffix.lower() in (".yaml", ".yml")
    try:
        text = path.read_text()
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror}") from None
    try:
        if yaml_file:
            import yaml

            return yaml.safe_load(text)
        return json.loads(text)
    except Exception as e:  # yaml.YAMLError, json.JSONDecodeError
        raise error(f"{path}: not valid {'YAML' if yaml_file else 'JSON'}: {e}") from None


def load_jobfile(path: str | Path) -> JobFile:
    """Read a YAML (``.yaml``/``.yml``) or JSON job file; errors name the file and the bad field."""
    path = Path(path)
    data = read_yaml_or_json(path, JobFileError, "job file")
    try:
        return parse_jobfile(data, path)
    except JobFileError as e:
        raise JobFileError(f"{path}: {e}") from None
