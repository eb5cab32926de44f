"""The models a worker serves: one Classifier per loaded version, the default version of each model, and rollouts.

Every route looks a model up here (`get`, or `lease` around a request's model work). A load verifies the new
version's checksums and creates its runtime session off the event loop, warms it up, and only then makes it the
model's default, in one assignment on the event loop. A request holds a lease on the version that admitted it, so
the version it started on answers it; a replaced version is stopped when its last lease is released. A version that
is missing, tampered with, fails to load or fails its warm-up is refused (ApiError, and a log line) and never takes
a request; the version already serving keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

from service.classifier import Classifier
from service.errors import ApiError
from service.metrics import service_metrics
from service.repository_layout import (
    PackageList,
    PackageSource,
    PlannedVersion,
    RepositoryError,
    check_name,
    model_settings,
    quoted,
    version_order,
)
from service.settings import ServiceSettings
from service.uploads import UploadBudget

log = logging.getLogger(__name__)

MEMORY_MEASURE = "rss_delta_at_load"  # what memory_bytes is: the worker's RSS growth while the version loaded


def resident_bytes() -> int:
    import psutil  # a BentoML dependency; only needed to measure a load

    return psutil.Process().memory_info().rss


class ModelVersion:
    """One loaded version: its Classifier and how many requests hold it (service.repository's leases)."""

    def __init__(self, classifier: Classifier) -> None:
        self.classifier = classifier
        self.in_flight = 0
        self.retiring = False  # replaced or unloaded: stops once in_flight is 0

    @property
    def version(self) -> str:
        return self.classifier.package.version


@dataclass
class ServedModel:
    """A model's loaded versions, the default one (None: not loaded), and what its loads have left behind."""

    name: str
    settings: ServiceSettings
    pinned: tuple[str, ...] = ()  # repository.json's versions: kept when another version becomes the default
    versions: dict[str, ModelVersion] = field(default_factory=dict)
    default: ModelVersion | None = None
    loading: asyncio.Task | None = None
    loading_version: str | None = None
    refused: dict[str, str] = field(default_factory=dict)  # version -> why its last load was refused
    refused_stamps: set = field(default_factory=set)  # (version, folder stamp) that polling will not retry
    unloaded: bool = False  # by request: polling leaves it alone until a load


class Lease:
    """A request's hold on one loaded version: `with repository.lease(...) as classifier:`."""

    def __init__(self, repository: ModelRepository, held: ModelVersion) -> None:
        self.repository = repository
        self.held = held
        self.classifier = held.classifier
        held.in_flight += 1

    def release(self) -> None:
        if self.held is not None:
            held, self.held = self.held, None
            held.in_flight -= 1
            if held.retiring and held.in_flight == 0:
                self.repository._stop_later(held)

    def __enter__(self) -> Classifier:
        return self.classifier

    def __exit__(self, *exc_info) -> None:
        self.release()


class ModelRepository:
    """The registry the routes use: models(), get(name, version), lease(...), load(name, version), unload(...)."""

    def __init__(self, settings: ServiceSettings, source: PackageSource) -> None:
        self.settings = settings  # the service-wide limits: body size, pixels, request timeout
        self.source = source
        self.uploads = UploadBudget(settings.max_upload_bytes_in_flight)  # one per worker, whatever the model
        self._models: dict[str, ServedModel] = {}
        self._retiring: set[ModelVersion] = set()  # replaced or unloaded, still answering their requests
        self._stopping: set[asyncio.Task] = set()
        self._poller: asyncio.Task | None = None
        self._served: tuple[str, ...] = ()
        # How many worker processes serve, and why (service.defaults); set by the service, shown by /metadata.
        self.workers: dict | None = None

    # ---- building ----------------------------------------------------------------------------------------------

    @classmethod
    def from_plan(cls, settings: ServiceSettings, source: PackageSource, planned: list[PlannedVersion]):
        """Create every planned version's Classifier (runtime sessions) now; `start` warms them up."""
        repository = cls(settings, source)
        for entry in planned:
            model = repository._model(entry.name, entry.settings)
            before = resident_bytes()
            classifier = Classifier(entry.settings, entry.package, repository.uploads)
            classifier.memory_bytes = max(0, resident_bytes() - before)  # its warm-up's growth is added in start()
            model.versions[entry.version] = ModelVersion(classifier)
        for model in repository._models.values():
            model.default = model.versions[version_order(model.versions)[-1]]
        repository._refresh_served()
        return repository

    @classmethod
    def single(cls, classifier: Classifier) -> ModelRepository:
        """A repository of one classifier made elsewhere (started and stopped by its owner, as in tests)."""
        repository = cls(classifier.settings, PackageList([classifier.package]))
        repository.uploads = classifier.uploads
        model = repository._model(classifier.package.name, classifier.settings)
        model.default = model.versions[classifier.package.version] = ModelVersion(classifier)
        repository._refresh_served()
        return repository

    def _model(self, name: str, settings: ServiceSettings) -> ServedModel:
        model = self._models.get(name)
        if model is None:
            pinned = self.source.model_config(name).versions or ()
            model = self._models[name] = ServedModel(name, settings, pinned)
        return model

    # ---- lifecycle ---------------------------------------------------------------------------------------------

    async def start(self, poll_s: float = 0.0) -> None:
        """Warm up every version loaded at start-up (then settle the garbage collector once); poll if asked."""
        loaded = [held for model in self._models.values() for held in model.versions.values()]
        for held in loaded:
            before = resident_bytes()
            await held.classifier.start(settle_gc=False)
            if held.classifier.memory_bytes is not None:
                held.classifier.memory_bytes += max(0, resident_bytes() - before)
            self._mark_loaded(held)
        if loaded and all(held.classifier.failure is None for held in loaded):
            from service import gc_settings

            gc_settings.settle()
        if poll_s:
            self._poller = asyncio.get_running_loop().create_task(self._poll_forever(poll_s))

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        for model in self._models.values():
            if model.loading is not None:
                model.loading.cancel()
        for held in [held for model in self._models.values() for held in model.versions.values()] + [*self._retiring]:
            await held.classifier.stop()
        if self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)

    @property
    def ready(self) -> bool:
        """At least one model serves, and every model's default version is ready."""
        defaults = [model.default for model in self._models.values() if model.default is not None]
        return bool(defaults) and all(held.classifier.ready for held in defaults)

    @property
    def failure(self) -> str | None:
        """Why a version loaded at start-up failed its warm-up (the worker is then dead); None if none did."""
        for model in self._models.values():
            for held in model.versions.values():
                if held.classifier.failure is not None:
                    return f"model {model.name!r} version {held.version!r}: {held.classifier.failure}"
        return None

    # ---- lookup ------------------------------------------------------------------------------------------------

    def models(self) -> list[str]:
        """The names of the models being served (with a default version), sorted."""
        return list(self._served)

    def _refresh_served(self) -> None:
        # Kept up to date on every change of a default, since every request asks (once per request, on the loop).
        self._served = tuple(sorted(name for name, model in self._models.items() if model.default is not None))

    def loaded(self) -> list[tuple[str, list[Classifier]]]:
        """(name, its loaded versions' classifiers lowest first) of every served model."""
        return [
            (name, [self._models[name].versions[v].classifier for v in version_order(self._models[name].versions)])
            for name in self.models()
        ]

    def versions(self, name: str) -> list[str]:
        """The loaded versions of a served model, lowest first."""
        model = self._models.get(name)
        return version_order(model.versions) if model is not None else []

    def default_version(self, name: str) -> str | None:
        model = self._models.get(name)
        return model.default.version if model is not None and model.default is not None else None

    def get(self, name: str | None = None, version: str | None = None) -> Classifier:
        """The classifier of `name` (the only model when None and one is served) at `version` (its default when
        None); ApiError 400 invalid_model_choice or 404 model_not_found / version_not_found naming what there is."""
        return self._find(name, version).classifier

    def lease(self, name: str | None = None, version: str | None = None) -> Lease:
        """get(), held: the version is not stopped before the lease is released, even if another replaces it."""
        return Lease(self, self._find(name, version))

    def _find(self, name: str | None, version: str | None) -> ModelVersion:
        served = self._served
        if name is None:
            if len(served) != 1:
                if not served:
                    raise ApiError("model_not_found", "no model is loaded (POST /v2/repository/models/NAME/load)")
                raise ApiError(
                    "invalid_model_choice",
                    f"this server serves {len(served)} models ({quoted(served)}): name one with `model` "
                    "(the query, or the body's `model` field)",
                )
            name = served[0]
        model = self._models.get(name)
        if model is None:
            raise ApiError("model_not_found", f"unknown model {name!r}; this server serves {quoted(served)}")
        if model.default is None:
            raise ApiError("model_not_found", f"model {name!r} is not loaded; this server serves {quoted(served)}")
        if version is None:
            return model.default
        held = model.versions.get(version)
        if held is None:
            raise ApiError(
                "version_not_found",
                f"unknown version {version!r} of model {name!r}; available: {quoted(version_order(model.versions))}",
            )
        return held

    # ---- rollout -----------------------------------------------------------------------------------------------

    async def load(self, name: str, version: str | None = None) -> Classifier:
        """Load `version` (by default the highest in the repository) of `name` and make it the default.

        Already loaded: it only becomes the default. Otherwise its checksums are verified and its session created
        off the event loop, it is warmed up, and then it replaces the default; the versions it replaces (other than
        repository.json's pinned ones) stop once their requests are answered. The load finishes even if the caller
        goes away. Refusals: 400 invalid_model_name, 404 model_not_found / version_not_found, 409 load_in_progress,
        422 package_invalid / model_load_failed.
        """
        try:
            check_name(name, "model")
            if version is not None:
                check_name(version, "version")
            available = self.source.versions(name)
        except RepositoryError as exc:
            raise ApiError(exc.code, str(exc)) from None
        if version is None:
            if not available:
                raise ApiError("version_not_found", f"model {name!r} has no version folders in {self.source.label}")
            version = available[-1]
        model = self._models.get(name)
        if model is not None and model.loading is not None:
            raise ApiError(
                "load_in_progress",
                f"model {name!r} is already loading version {model.loading_version!r}; retry when it is done",
            )
        if model is not None and version in model.versions:
            self._switch(model, model.versions[version])
            return model.versions[version].classifier
        if model is None:
            model = self._model(name, model_settings(self.source, self.settings, name, len(self.models()) + 1))
        model.loading_version = version
        model.loading = asyncio.get_running_loop().create_task(self._load(model, version))
        model.loading.add_done_callback(_retrieved)
        return await asyncio.shield(model.loading)

    async def _load(self, model: ServedModel, version: str) -> Classifier:
        metrics = service_metrics()
        name = model.name
        stamp = self._stamp(name, version)
        try:
            before = resident_bytes()
            classifier = await asyncio.get_running_loop().run_in_executor(None, self._create, model, version)
            await classifier.start(settle_gc=False)
            if classifier.failure is not None:
                await classifier.stop()
                raise ApiError("model_load_failed", f"model {name!r} version {version!r}: {classifier.failure}")
            classifier.memory_bytes = max(0, resident_bytes() - before)
        except ApiError as exc:
            model.refused[version] = exc.message
            model.refused_stamps.add((version, stamp))
            metrics.model_loads.labels(name, "refused").inc()
            serving = model.default.version if model.default is not None else None
            log.warning(
                "visionserve: refused model %r version %r: %s; %s",
                name,
                version,
                exc.message,
                f"version {serving!r} keeps serving" if serving else "the model is not served",
            )
            raise
        finally:
            model.loading = model.loading_version = None
        model.refused.pop(version, None)
        model.unloaded = False
        metrics.model_loads.labels(name, "loaded").inc()
        self._switch(model, ModelVersion(classifier))
        log.info(
            "model %r version %r loaded (%d bytes of RSS) and now the default", name, version, classifier.memory_bytes
        )
        return classifier

    def _create(self, model: ServedModel, version: str) -> Classifier:
        """In a thread: verify the version's package and create its runtime session (both block)."""
        try:
            package = self.source.package(model.name, version, model.settings.backend)
        except RepositoryError as exc:
            raise ApiError(exc.code, str(exc)) from None
        try:
            return Classifier(model.settings, package, self.uploads)
        except Exception as exc:  # the runtime's own error types (a graph it cannot load, a missing provider)
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise ApiError(
                "model_load_failed",
                f"model {model.name!r} version {version!r}: cannot create its session: {first_line}",
            ) from None

    def _stamp(self, name: str, version: str) -> Any:
        try:
            return self.source.stamp(name, version)
        except OSError:
            return None

    def _switch(self, model: ServedModel, chosen: ModelVersion) -> None:
        """Make `chosen` the default (one assignment, on the event loop) and retire what it replaces."""
        model.versions[chosen.version] = chosen
        model.default = chosen
        self._refresh_served()
        self._mark_loaded(chosen)
        for held in list(model.versions.values()):
            if held is not chosen and held.version not in model.pinned:
                self._retire(model, held)

    def unload(self, name: str, version: str | None = None) -> list[str]:
        """Stop serving `version` of `name` (every version when None); returns the versions unloaded. Requests
        holding them are answered first. The default moves to the highest version left, if any."""
        try:
            check_name(name, "model")
            if version is not None:
                check_name(version, "version")
        except RepositoryError as exc:
            raise ApiError(exc.code, str(exc)) from None
        model = self._models.get(name)
        if model is None or not model.versions:
            raise ApiError(
                "model_not_found", f"model {name!r} is not loaded; this server serves {quoted(self.models())}"
            )
        if model.loading is not None:
            raise ApiError("load_in_progress", f"model {name!r} is loading version {model.loading_version!r}")
        if version is not None and version not in model.versions:
            raise ApiError(
                "version_not_found",
                f"version {version!r} of model {name!r} is not loaded; loaded: {quoted(version_order(model.versions))}",
            )
        chosen = [model.versions[version]] if version is not None else list(model.versions.values())
        for held in chosen:
            self._retire(model, held)
        left = version_order(model.versions)
        model.default = model.versions[left[-1]] if left else None
        self._refresh_served()
        if version is None:
            model.unloaded = True
        log.info("model %r: unloaded %s", name, quoted(held.version for held in chosen))
        return [held.version for held in chosen]

    def _retire(self, model: ServedModel, held: ModelVersion) -> None:
        model.versions.pop(held.version, None)
        held.retiring = True
        self._retiring.add(held)
        service_metrics().model_loaded.labels(model.name, held.version).set(0)
        if held.in_flight == 0:
            self._stop_later(held)

    def _stop_later(self, held: ModelVersion) -> None:
        self._retiring.discard(held)
        task = asyncio.get_running_loop().create_task(held.classifier.stop())
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    def _mark_loaded(self, held: ModelVersion) -> None:
        metrics = service_metrics()
        name, version = held.classifier.package.name, held.version
        metrics.model_loaded.labels(name, version).set(1)
        if held.classifier.memory_bytes is not None:
            metrics.model_memory_bytes.labels(name, version).set(held.classifier.memory_bytes)

    # ---- the repository extension's index, and polling ---------------------------------------------------------

    def index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """Triton's repository index: every version on disk or loaded, with its state (READY, LOADING, UNAVAILABLE,
        UNLOADING) and the reason it is not ready."""
        entries = []
        try:
            names = set(self.source.model_names(strict=False))
        except (RepositoryError, OSError) as exc:
            log.warning("cannot list the repository: %s", exc)
            names = set()
        for name in sorted(names | set(self._models)):
            model = self._models.get(name)
            try:
                on_disk = self.source.versions(name, strict=False)
            except (RepositoryError, OSError):
                on_disk = []
            loaded = model.versions if model is not None else {}
            for version in version_order(set(on_disk) | set(loaded)):
                state, reason = self._state(model, version)
                if not ready_only or state == "READY":
                    entries.append({"name": name, "version": version, "state": state, "reason": reason})
        return entries

    @staticmethod
    def _state(model: ServedModel | None, version: str) -> tuple[str, str]:
        if model is not None and version in model.versions:
            classifier = model.versions[version].classifier
            if classifier.ready:
                return "READY", ""
            if classifier.failure is not None:
                return "UNAVAILABLE", classifier.failure
            return "LOADING", "warming up"
        if model is not None and model.loading_version == version:
            return "LOADING", "verifying, creating the session and warming up"
        if model is not None and version in model.refused:
            return "UNAVAILABLE", f"load refused: {model.refused[version]}"
        return "UNAVAILABLE", "unloaded" if model is not None and model.unloaded else "not loaded"

    async def poll_once(self) -> list[str]:
        """Load each model's highest version in the repository when it is higher than its default (or the model is
        new); skipped: pinned or unloaded models, and a version already refused unless its folder was replaced.
        Returns what it loaded, as "name/version"."""
        try:
            names = self.source.model_names(strict=False)
        except (RepositoryError, OSError) as exc:
            log.warning("visionserve: repository poll: %s", exc)
            return []
        done = []
        for name in names:
            model = self._models.get(name)
            if model is not None and (model.unloaded or model.pinned or model.loading is not None):
                continue
            try:
                available = self.source.versions(name, strict=False)
            except (RepositoryError, OSError) as exc:
                log.warning("visionserve: repository poll: %s", exc)
                continue
            if not available:
                continue
            highest = available[-1]
            if model is not None and model.default is not None:
                current = model.default.version
                if version_order([current, highest])[-1] == current:
                    continue
            if model is not None and (highest, self._stamp(name, highest)) in model.refused_stamps:
                continue
            with contextlib.suppress(ApiError):  # refused: logged by _load, kept in refused_stamps
                await self.load(name, highest)
                done.append(f"{name}/{highest}")
        return done

    async def _poll_forever(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.poll_once()
            except Exception:  # a poll must never end polling
                log.exception("repository poll failed")


def _retrieved(task: asyncio.Task) -> None:
    """Take a load's outcome, so that one whose caller went away is not reported as never retrieved."""
    if not task.cancelled():
        task.exception()


def summaries(repository: ModelRepository) -> list[dict[str, Any]]:
    """One line per loaded version, for /metadata's `models` list."""
    rows = []
    for name, classifiers in repository.loaded():
        default = repository.default_version(name)
        for classifier in classifiers:
            rows.append(
                {
                    "name": name,
                    "version": classifier.package.version,
                    "default": classifier.package.version == default,
                    "ready": classifier.ready,
                    "arch": classifier.spec.arch,
                    "num_classes": classifier.num_classes,
                    "backend": classifier.info.backend,
                    "device": classifier.info.device,
                    "intra_op_threads": classifier.info.intra_op_threads,
                    "max_batch_size": classifier.settings.max_batch_size,
                    "max_queue": classifier.settings.max_queue,
                    "model_instances": classifier.settings.model_instances,
                    "memory_bytes": classifier.memory_bytes,
                    "memory_measure": MEMORY_MEASURE,
                }
            )
    return rows


def as_repository(served: ModelRepository | Classifier) -> ModelRepository:
    """A repository as it is, or one classifier as a repository of one model (tests, and callers made for one)."""
    return served if isinstance(served, ModelRepository) else ModelRepository.single(served)
