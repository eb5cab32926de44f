"""Regenerate grpc_service_pb2.py, .pyi and _pb2_grpc.py from grpc_service.proto: `python -m service.protos.generate`.

Needs grpcio-tools (`pip install grpcio-tools`; only here, never at run time). The generated modules are committed,
and they need a protobuf runtime at least as new as the protoc inside that grpcio-tools and a grpcio at least as
new as grpcio-tools itself (the modules check both on import): keep pyproject's and the bentofiles' floors in step.

One edit follows protoc: the file is registered in a descriptor pool of its own instead of protobuf's default
pool. Every KServe v2 implementation declares the same `inference.*` names, and the default pool refuses a second
definition of a name ("duplicate symbol 'inference.ServerLiveRequest'", as with tritonclient beside MLServer or
KServe), so without it this service and tritonclient.grpc could not be imported into one process.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROTO = "service/protos/grpc_service.proto"  # relative to REPO, which is also the import root of the modules
DEFAULT_POOL = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
PRIVATE_POOL = (
    "# Added by service/protos/generate.py: a pool of its own, so that other `inference.*` definitions (tritonclient's)\n"
    "# can live in the same process.\n"
    "_POOL = _descriptor_pool.DescriptorPool()\n"
    "DESCRIPTOR = _POOL.AddSerializedFile("
)


def generate() -> list[Path]:
    from grpc_tools import protoc  # the build-time tool: imported only when regenerating

    arguments = [
        "protoc",
        f"-I{REPO}",
        f"--python_out={REPO}",
        f"--pyi_out={REPO}",
        f"--grpc_python_out={REPO}",
        str(REPO / PROTO),
    ]
    if protoc.main(arguments) != 0:
        raise SystemExit(f"protoc failed on {PROTO}")
    module = REPO / PROTO.replace(".proto", "_pb2.py")
    text = module.read_text()
    if text.count(DEFAULT_POOL) != 1:
        raise SystemExit(f"{module}: protoc's output changed; expected one `{DEFAULT_POOL}` line to redirect")
    module.write_text(text.replace(DEFAULT_POOL, PRIVATE_POOL))
    return [module, module.with_suffix(".pyi"), module.with_name(module.stem + "_grpc.py")]


def main() -> int:
    for path in generate():
        print(path.relative_to(REPO))
    return 0


if __name__ == "__main__":
    sys.exit(main())
