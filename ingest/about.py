"""`--about` and `--version`, generated from the one definition of the settings (ingest/config.py)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

import orjson

from sinks import kit

from .config import ENV_PREFIX, all_settings

NAME = "singer-ingest"
DESCRIPTION = ("A Singer target that scales out: a thin feeder onto Redis Streams, RQ workers that own the sinks "
               "and commit STATE once the data before it is loaded.")
CAPABILITIES = ("about", "activate-version", "hard-delete", "soft-delete", "validate-records", "target-schema",
                "batch", "stream-maps", "schema-flattening")


def package_version() -> str:
    try:
        return version(NAME)
    except PackageNotFoundError:
        return "unknown"


def about() -> dict:
    return {
        "name": NAME,
        "version": package_version(),
        "description": DESCRIPTION,
        "capabilities": list(CAPABILITIES),
        "destinations": [{"name": p.name, "exactness": p.exactness, "description": p.description,
                          "extra": p.extra} for p in kit.plugins().values()],
        "settings": [{"name": s.name, "type": s.type.__name__, "default": s.default, "scope": s.scope,
                      "secret": s.secret, "choices": list(s.choices) or None, "env": ENV_PREFIX + s.name.upper(),
                      "destination": s.destination, "description": s.help} for s in all_settings()],
    }


def about_markdown() -> str:
    info = about()
    shown = None
    lines = [f"# {info['name']} {info['version']}", "", info["description"], "",
             "Capabilities: " + ", ".join(info["capabilities"]), "",
             "| setting | type | default | scope | meaning |", "|---|---|---|---|---|"]
    for s in info["settings"]:
        if s["destination"] is not None and s["destination"] != shown:
            shown = s["destination"]
            plugin = kit.get(shown)
            extra = f" (`pip install 'singer-ingest[{plugin.extra}]'`)" if plugin.extra else ""
            lines.append(f"| **{shown}** | | | | {plugin.description}{extra} |")
        default = "(unset)" if s["default"] is None else str(s["default"]).lower() if isinstance(s["default"], bool) \
            else s["default"]
        extra = f" One of: {', '.join(s['choices'])}." if s["choices"] else ""
        secret = " Secret: never logged, never sent through Redis." if s["secret"] else ""
        lines.append(f"| `{s['name']}` | {s['type']} | {default} | {s['scope']} | {s['description']}{extra}{secret} |")
    return "\n".join(lines) + "\n"


def about_json() -> bytes:
    return orjson.dumps(about(), option=orjson.OPT_INDENT_2) + b"\n"
