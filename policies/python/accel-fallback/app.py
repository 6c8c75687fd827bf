"""accel-fallback, in Python: the twin of policies/accel-fallback (Rust).

A task that asks for kvm on a host whose KVM is not usable runs under tcg
instead, with the reason; a task that forbids the fallback is rejected; every
other task is left alone. No settings.

Built into a WebAssembly component by build.sh (componentize-py); passes the
Rust twin's CASES.toml through `qemu-executor policy test`.
"""

import dataclasses
import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import types

NAME = "accel-fallback"
VERSION = "0.1.0"


def parse_settings(text: str) -> dict:
    """Settings as the host passes them: JSON, "" meaning {}. This policy
    takes none, so any key is refused (like serde's deny_unknown_fields)."""
    try:
        settings = json.loads(text) if text.strip() else {}
    except ValueError as e:
        raise ValueError(f"not valid JSON: {e}") from None
    if not isinstance(settings, dict):
        raise ValueError("expected a JSON object")
    for key in settings:
        raise ValueError(f"unknown field {key!r}: this policy takes no settings")
    return settings


class Evaluator(exports.Evaluator):
    def metadata(self) -> types.PolicyMetadata:
        return types.PolicyMetadata(name=NAME, version=VERSION, rewrites=True)

    def check_settings(self, settings: str) -> None:
        try:
            parse_settings(settings)
        except ValueError as e:
            raise Err(f"Bad settings for {NAME}: {e}")

    def evaluate(
        self, task: types.Task, facts: types.HostFacts, settings: str
    ) -> types.Decision:
        try:
            parse_settings(settings)
        except ValueError as e:
            return types.Decision_Reject(f"Bad settings for {NAME}: {e}")

        kvm = facts.kvm
        if task.accelerator != types.Accelerator.KVM or isinstance(
            kvm, types.KvmStatus_Usable
        ):
            return types.Decision_Accept()
        if isinstance(kvm, types.KvmStatus_Absent):
            why = "this host has no KVM (/dev/kvm is absent)"
        else:
            why = f"KVM is unusable on this host: {kvm.value}"
        if not task.kvm_fallback:
            return types.Decision_Reject(
                f"the task asks for kvm and forbids falling back to tcg, but {why}"
            )
        tcg = dataclasses.replace(task, accelerator=types.Accelerator.TCG)
        return types.Decision_Rewrite(
            types.Rewrite(task=tcg, reason=f"{why}; running under tcg instead of kvm")
        )
