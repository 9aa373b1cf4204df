"""Which CPU a benchmark ran on, for the record beside every figure.

Cloud VMs here report only "AMD EPYC" as the model name, yet the same benchmark gives very
different ratios on a Zen 3 (AVX2 only), a Zen 4 (AVX-512) and an Intel Sapphire Rapids
(AVX-512 + AMX): the family/model numbers and the widest vector extension tell them apart.
"""
from __future__ import annotations

import platform

# Widest first: the first extension present names the machine's kind.
_VECTOR_EXTENSIONS = (("amx_tile", "AVX-512 + AMX"), ("avx512f", "AVX-512"), ("avx2", "AVX2"))


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """e.g. 'AMD EPYC (family 25 model 17, AVX-512)': the first processor's model name, family,
    model and widest vector extension; the platform's processor name where there is no cpuinfo."""
    fields: dict[str, str] = {}
    try:
        with open(cpuinfo) as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or platform.machine()
    name = fields.get("model name") or platform.processor() or platform.machine()
    details = []
    if "cpu family" in fields and "model" in fields:
        details.append(f"family {fields['cpu family']} model {fields['model']}")
    flags = set(fields.get("flags", "").split())
    details += [label for flag, label in _VECTOR_EXTENSIONS if flag in flags][:1]
    return f"{name} ({', '.join(details)})" if details else name
