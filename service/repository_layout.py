"""Where the served models come from: a model repository folder in Triton's layout with its config file, or the
packages of VISIONSERVE_MODEL; their names, versions, settings and verified packages, every problem a one-line error.

VISIONSERVE_MODEL's packages (one, or several comma-separated) are a repository of one version per model.
A repository is `DIR/<name>/<version>/manifest.json + files` (docs/models.md). Folders whose names start with "."
are ignored, so that a version copied in under a hidden name and then renamed appears whole. `DIR/repository.json`
(optional) sets each model's batching, threads, backend and versions:

    {"models": {"resnet": {"max_batch_size": 32, "model_instances": 2, "versions": ["3"]}}}
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inference.package import BACKEND_FILES, ModelPackage, PackageError, load_package
from service.classifier import resolve_package
from service.settings import ServiceSettings, SettingsError

CONFIG_NAME = "repository.json"
# A model or version name: a plain folder name, never a path ("/", "\\", "..") nor a hidden folder.
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# repository.json's keys for one model and the type each takes (bool is refused where int is asked).
MODEL_KEYS: dict[str, type] = {
    "max_batch_size": int,
    "max_latency_ms": float,
    "max_queue": int,
    "model_instances": int,
    "backend": str,
    "threads": int,
    "versions": list,
}

KIND_NAMES = {int: "an integer", float: "a number", str: "a string", list: "a list"}


class RepositoryError(ValueError):
    """A repository, model or version that cannot be served; `code` is its error code in service.errors."""

    def __init__(self, message: str, code: str = "package_invalid") -> None:
        super().__init__(message)
        self.code = code


def version_order(versions: Iterable[str]) -> list[str]:
    """Lowest first: numerically when every version is all digits (2 < 10), else lexically ("2024-01" < "2024-02")."""
    versions = list(versions)
    if all(version.isdigit() for version in versions):
        return sorted(versions, key=lambda version: (int(version), version))
    return sorted(versions)


def check_name(value: Any, what: str) -> str:
    """`value` if it is a safe model or version name, else RepositoryError (invalid_model_name)."""
    if not isinstance(value, str) or not SAFE_NAME.match(value):
        raise RepositoryError(
            f"{what} {value!r} is not a valid name: letters, digits, '.', '_' and '-', starting with a letter or digit "
            "(no path separators, no '..')",
            "invalid_model_name",
        )
    return value


def quoted(names: Iterable[str]) -> str:
    names = list(names)
    return ", ".join(repr(name) for name in names) if names else "none"


@dataclass(frozen=True)
class ModelConfig:
    """One model's entry of repository.json; None = the service-wide setting (VISIONSERVE_*)."""

    max_batch_size: int | None = None
    max_latency_ms: float | None = None
    max_queue: int | None = None
    model_instances: int | None = None
    backend: str | None = None
    threads: int | None = None  # runtime threads of this model; None = its share of the worker's (thread_share)
    versions: tuple[str, ...] | None = None  # served at start and kept through rollouts; None = the highest only

    @classmethod
    def parse(cls, name: str, entry: Any, where: str) -> ModelConfig:
        if not isinstance(entry, dict):
            raise RepositoryError(f"{where}: model {name!r} must map to an object of settings")
        unknown = sorted(set(entry) - set(MODEL_KEYS))
        if unknown:
            raise RepositoryError(f"{where}: model {name!r} has unknown keys {unknown}; valid: {sorted(MODEL_KEYS)}")
        values: dict[str, Any] = {}
        for key, value in entry.items():
            kind = MODEL_KEYS[key]
            ok = isinstance(value, (int, float)) if kind is float else isinstance(value, kind)
            if not ok or isinstance(value, bool):
                raise RepositoryError(f"{where}: model {name!r}: {key} must be {KIND_NAMES[kind]}, got {value!r}")
            values[key] = value
        for key in ("max_batch_size", "max_queue", "model_instances", "threads"):
            if key in values and values[key] < 1:
                raise RepositoryError(f"{where}: model {name!r}: {key} must be >= 1, got {values[key]}")
        if values.get("max_latency_ms", 0) < 0:
            raise RepositoryError(
                f"{where}: model {name!r}: max_latency_ms must be >= 0, got {values['max_latency_ms']}"
            )
        if "backend" in values and values["backend"] not in BACKEND_FILES:
            raise RepositoryError(
                f"{where}: model {name!r}: backend {values['backend']!r} is unknown; valid: {', '.join(BACKEND_FILES)}"
            )
        if "versions" in values:
            versions = values["versions"]
            if not versions:
                raise RepositoryError(f"{where}: model {name!r}: versions must list at least one version")
            values["versions"] = tuple(check_name(version, f"{where}: model {name!r}: version") for version in versions)
        return cls(**values)

    def settings(self, base: ServiceSettings, threads: int) -> ServiceSettings:
        """The service's settings with this model's values: its own batcher, queue, instances and threads."""
        values = {
            field.name: getattr(self, field.name)
            for field in dataclasses.fields(self)
            if field.name not in ("versions", "threads") and getattr(self, field.name) is not None
        }
        try:
            return dataclasses.replace(base, threads=self.threads or threads, **values)
        except SettingsError as exc:  # e.g. a max_queue below VISIONSERVE_MAX_BATCH_IMAGES
            raise RepositoryError(f"{CONFIG_NAME}: {exc}") from None


def thread_share(settings: ServiceSettings, models: int) -> int:
    """Runtime threads of each model that repository.json gives none: the worker's threads split evenly, so that
    the models' sessions together use the worker's cores and one model's calls cannot take another's."""
    return max(1, settings.threads_per_worker // max(1, models))


def read_config(root: Path) -> dict[str, ModelConfig]:
    """repository.json's models (none when the file is absent); RepositoryError for anything it cannot mean."""
    path = root / CONFIG_NAME
    if not path.exists():
        return {}
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RepositoryError(f"{path} is not readable JSON: {str(exc)[:200]}") from None
    if not isinstance(document, dict):
        raise RepositoryError(f'{path} must be a JSON object: {{"models": {{"<name>": {{...}}}}}}')
    unknown = sorted(set(document) - {"models"})
    if unknown:
        raise RepositoryError(f"{path} has unknown keys {unknown}; valid: ['models']")
    models = document.get("models", {})
    if not isinstance(models, dict):
        raise RepositoryError(f'{path}: "models" must map model names to their settings')
    return {
        check_name(name, f"{path}: model"): ModelConfig.parse(name, entry, str(path)) for name, entry in models.items()
    }


class RepositoryFolder:
    """A model repository on disk: DIR/<name>/<version>/ package folders, and DIR/repository.json."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise RepositoryError(f"model repository {root} is not a folder", "model_not_found")
        self.config = read_config(self.root)
        missing = sorted(name for name in self.config if not (self.root / name).is_dir())
        if missing:
            raise RepositoryError(
                f"{self.root / CONFIG_NAME} names models with no folder in {self.root}: {quoted(missing)}",
                "model_not_found",
            )

    @property
    def label(self) -> str:
        return str(self.root)

    def model_names(self, strict: bool = True) -> list[str]:
        """Every model folder's name, sorted; a folder name that is not a safe name is an error (`strict`, as at
        start-up) or left out (a poll)."""
        return sorted(_folder_names(self.root, f"model folder in {self.root}", strict))

    def model_config(self, name: str) -> ModelConfig:
        return self.config.get(name, ModelConfig())

    def versions(self, name: str, strict: bool = True) -> list[str]:
        """The model's version folders, lowest first (version_order); `strict` as in model_names."""
        folder = self.root / check_name(name, "model")
        if not folder.is_dir():
            raise RepositoryError(
                f"unknown model {name!r}; the repository {self.root} has {quoted(self.model_names())}",
                "model_not_found",
            )
        return version_order(_folder_names(folder, f"version folder of model {name!r}", strict))

    def version_folder(self, name: str, version: str) -> Path:
        """The folder of one version: a real folder inside the repository (a link out of it is refused)."""
        check_name(name, "model")
        check_name(version, "version")
        path = self.root / name / version
        if not path.exists():
            raise RepositoryError(
                f"model {name!r} has no version {version!r} in {self.root}; it has {quoted(self.versions(name))}",
                "version_not_found",
            )
        resolved = path.resolve()
        if self.root not in resolved.parents:
            raise RepositoryError(f"{path} points outside the repository {self.root}", "invalid_model_name")
        if not resolved.is_dir():
            raise RepositoryError(f"{path} is not a folder (a version is a package folder)", "invalid_model_name")
        return resolved

    def stamp(self, name: str, version: str) -> tuple[int, int]:
        """What changes when the version's folder is replaced (a new folder renamed in): inode and mtime."""
        status = (self.root / name / version).stat()
        return status.st_ino, status.st_mtime_ns

    def package(self, name: str, version: str, backend: str) -> ModelPackage:
        """The version's package, verified (every file's sha256) and naming itself as its folders do."""
        folder = self.version_folder(name, version)
        package = verified(folder, name, version, backend)
        if (package.name, package.version) != (name, version):
            raise RepositoryError(
                f"{folder}: its manifest says model {package.name!r} version {package.version!r}; a repository "
                f"holds it as {package.name}/{package.version}/ (the folders name what is served)"
            )
        return package


def verified(folder: Path, name: str, version: str, backend: str) -> ModelPackage:
    """load_package (every file's sha256) with the backend's file present; any failure a RepositoryError."""
    try:
        package = load_package(folder)
        package.model_path(backend)
    except PackageError as exc:
        raise RepositoryError(f"model {name!r} version {version!r}: {exc}") from None
    except Exception as exc:  # a file the ONNX reader cannot parse, an unreadable folder
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        raise RepositoryError(
            f"model {name!r} version {version!r}: cannot read its package: {type(exc).__name__}: {reason}"
        ) from None
    return package


def _folder_names(parent: Path, what: str, strict: bool) -> list[str]:
    names = []
    for path in parent.iterdir():
        if not path.is_dir() or path.name.startswith("."):
            continue
        if strict:
            names.append(check_name(path.name, what))
        elif SAFE_NAME.match(path.name):
            names.append(path.name)
    return names


class PackageList:
    """The packages of VISIONSERVE_MODEL (folders or model-store tags, comma-separated), one model and version each,
    named by their manifests."""

    def __init__(self, packages: list[ModelPackage]) -> None:
        self.packages: dict[str, ModelPackage] = {}
        for package in packages:
            if package.name in self.packages:
                raise RepositoryError(
                    f"two packages are both model {package.name!r} ({self.packages[package.name].root} and "
                    f"{package.root}); serve versions of one model from a repository folder"
                )
            self.packages[package.name] = package

    @property
    def label(self) -> str:
        return ", ".join(str(package.root) for package in self.packages.values())

    def model_names(self, strict: bool = True) -> list[str]:
        return list(self.packages)

    def model_config(self, name: str) -> ModelConfig:
        return ModelConfig()

    def _package_of(self, name: str) -> ModelPackage:
        if name not in self.packages:
            raise RepositoryError(
                f"unknown model {name!r}; this server serves {quoted(self.packages)}", "model_not_found"
            )
        return self.packages[name]

    def versions(self, name: str, strict: bool = True) -> list[str]:
        return [self._package_of(name).version]

    def stamp(self, name: str, version: str) -> tuple[int, int]:
        status = self._package_of(name).root.stat()
        return status.st_ino, status.st_mtime_ns

    def package(self, name: str, version: str, backend: str) -> ModelPackage:
        """The package again, re-verified: a reload refuses files changed since start-up."""
        check_name(version, "version")
        served = self._package_of(name)
        if version != served.version:
            raise RepositoryError(
                f"unknown version {version!r} of model {name!r}; available: {served.version!r}", "version_not_found"
            )
        package = verified(served.root, name, version, backend)
        if (package.name, package.version) != (name, version):
            raise RepositoryError(
                f"{package.root} now says model {package.name!r} version {package.version!r}, not {name!r} {version!r}"
            )
        return package


PackageSource = RepositoryFolder | PackageList


@dataclass(frozen=True)
class PlannedVersion:
    """A version to serve from start-up: its verified package and its model's settings."""

    name: str
    version: str
    package: ModelPackage
    settings: ServiceSettings


def open_source(settings: ServiceSettings) -> PackageSource:
    """VISIONSERVE_REPOSITORY if set, else the packages of VISIONSERVE_MODEL (verified)."""
    if settings.repository:
        return RepositoryFolder(settings.repository)
    return PackageList([resolve_package(reference) for reference in settings.model_references])


def model_settings(source: PackageSource, settings: ServiceSettings, name: str, models: int) -> ServiceSettings:
    """One model's settings: the service's, its repository.json entry's, and its share of the threads."""
    config = source.model_config(name)
    if models == 1 and config == ModelConfig():
        return settings  # one model as VISIONSERVE_MODEL serves it: exactly the service's settings
    return config.settings(settings, thread_share(settings, models))


def plan(source: PackageSource, settings: ServiceSettings) -> list[PlannedVersion]:
    """Every version to serve at start-up, verified: each model's configured versions, else its highest."""
    names = source.model_names()
    if not names:
        raise RepositoryError(f"model repository {source.label} holds no models (<name>/<version>/manifest.json)")
    planned = []
    for name in names:
        served = model_settings(source, settings, name, len(names))
        versions = source.model_config(name).versions
        if versions is None:
            available = source.versions(name)
            if not available:
                raise RepositoryError(f"model {name!r} in {source.label} has no version folders", "version_not_found")
            versions = (available[-1],)
        for version in versions:
            planned.append(PlannedVersion(name, version, source.package(name, version, served.backend), served))
    return planned
