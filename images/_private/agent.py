"""The on-device image agent: boot assessment, the trial's health window, commit or mark
bad, and the update client.

At every boot the agent records which slot runs (`BOOTED_SLOT`) and what the boot means
(`boot.assess`): committed, on trial, or rolled back (the preferred slot ran out of trial
boots, so the boot loader fell back: that slot is marked bad). On trial it watches the
appliance: ready (`/readyz`), joined to its router (`/health` says `"router": "joined"`;
a node without a router needs readiness alone), and healthy for `window` seconds on end →
commit (`mark_good`: the only place MIN_VERSION moves). The appliance exiting, or staying
unhealthy for `deadline` seconds on end → mark bad, and the caller reboots (the boot loader
then picks the other slot). Every step is an event in `DATA/image/events.jsonl`, which the
appliance copies into its audit log.

The update client (an enrolled node only) asks the router's fleet listener for an offer
over mTLS with the node's certificate, streams the bundle under `DATA/image/downloads/`,
checks its size and SHA-256 against the offer, flashes the inactive slot (`flash_bundle`,
which verifies the bundle against the node's own pinned release keys, `DATA/image/trust.json`)
and reports each step (`PUT /federation/v1/image`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import httpx
import msgspec

from federation import (
    ENCODER,
    UPDATE_OFFER_DECODER,
    ImageReport,
    NodeCredentials,
    PalisadeError,
    RolloutOutcome,
    UpdateOffer,
    client_context,
    replace_private,
    router_dns_name,
)
from images._private.boot import Assessment, assess, mark_bad, mark_good, record_booted
from images._private.bootstate import BootState, Slot
from images._private.disk import read_boot_state, update_boot_state
from images._private.errors import ImageError
from images._private.events import EventName, record_event
from images._private.flash import flash_bundle
from images._private.keys import TrustSet, node_trust_file

log = logging.getLogger("palisade.images.agent")

DEFAULT_WINDOW_S = 60.0
DEFAULT_DEADLINE_S = 300.0
DEFAULT_POLL_S = 0.5
DEFAULT_UPDATE_POLL_S = 30.0
PENDING_FILE = "rollout.json"
ASSESSED_FILE = "assessed-boot"  # the kernel boot id the agent last assessed
Verdict = Literal["waiting", "commit", "fail"]
_PROBE_TIMEOUT = httpx.Timeout(2.0)


# --- the trial's health window ------------------------------------------------------------


@dataclass(frozen=True)
class Health:
    """One look at the appliance."""

    alive: bool  # its process runs (always True where the agent cannot see the process)
    ready: bool  # `/readyz` answered 200
    joined: bool  # its router accepted its heartbeat (True for a node without a router)

    @property
    def healthy(self) -> bool:
        return self.alive and self.ready and self.joined


class HealthWindow:
    """Decides a trial boot from successive looks: commit after `window` seconds healthy
    on end; fail when the process exits or after `deadline` seconds unhealthy on end (from
    the start of the trial, or from the last time it was healthy)."""

    def __init__(
        self, *, window: float, deadline: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.window = window
        self.deadline = deadline
        self._clock = clock
        self._healthy_since: float | None = None
        self._unhealthy_since: float | None = clock()

    def observe(self, health: Health) -> tuple[Verdict, str]:
        now = self._clock()
        if not health.alive:
            return "fail", "the appliance exited during its trial boot"
        if health.healthy:
            self._unhealthy_since = None
            if self._healthy_since is None:
                self._healthy_since = now
            if now - self._healthy_since >= self.window:
                return "commit", f"healthy for {self.window:g} s"
            return "waiting", ""
        self._healthy_since = None
        if self._unhealthy_since is None:
            self._unhealthy_since = now
        if now - self._unhealthy_since >= self.deadline:
            missing = "not ready" if not health.ready else "not joined to its router"
            return "fail", f"{missing} for {self.deadline:g} s"
        return "waiting", ""


class ApplianceProbe:
    """Looks at the local appliance through its HTTP endpoints."""

    def __init__(self, url: Callable[[], str | None], *, verify: ssl.SSLContext | bool) -> None:
        self._url = url
        self._client = httpx.Client(timeout=_PROBE_TIMEOUT, verify=verify)

    def close(self) -> None:
        self._client.close()

    def look(self, *, alive: bool) -> Health:
        url = self._url()
        if not alive or url is None:
            return Health(alive=alive, ready=False, joined=False)
        try:
            ready = self._client.get(f"{url}/readyz").status_code == 200
            health = self._client.get(f"{url}/health")
            router = health.json().get("router") if health.status_code == 200 else "unknown"
        except (httpx.HTTPError, ValueError, AttributeError):
            return Health(alive=alive, ready=False, joined=False)
        return Health(alive=alive, ready=ready, joined=router in (None, "joined"))


def probe_verify(data_dir: Path) -> ssl.SSLContext | bool:
    """What checks the local appliance's certificate: an enrolled node serves HTTPS with its
    fleet certificate, checked against the fleet CA. The name is not checked: the probe
    talks to this node's own process on a loopback address, not to a peer."""
    credentials = NodeCredentials.load(data_dir)
    if not credentials.enrolled:
        return True
    context = client_context(credentials.ca_path)
    context.check_hostname = False
    return context


def watch_trial(
    window: HealthWindow,
    look: Callable[[], Health],
    *,
    stop: threading.Event,
    poll_s: float = DEFAULT_POLL_S,
) -> tuple[Verdict, str]:
    """Look every `poll_s` until the window decides (or `stop` is set: "waiting")."""
    while not stop.is_set():
        verdict, reason = window.observe(look())
        if verdict != "waiting":
            return verdict, reason
        stop.wait(poll_s)
    return "waiting", "stopped"


# --- the boot state and its events ----------------------------------------------------------


class NodeImage:
    """One node's disk (boot state) and data directory (events, slot configs, trust)."""

    def __init__(self, disk: Path, data_dir: Path) -> None:
        self.disk = disk
        self.data_dir = data_dir

    @property
    def image_dir(self) -> Path:
        return self.data_dir / "image"

    def state(self) -> BootState:
        return read_boot_state(self.disk)

    def boot(self, slot: Slot) -> Assessment:
        """Record the boot of `slot` and what it means; on a rollback, mark the slot that
        ran out of trial boots bad and put the booted one first."""
        found: list[Assessment] = []

        def booted(state: BootState) -> BootState:
            assessment = assess(record_booted(state, slot), slot)
            found.append(assessment)
            return assessment.new_state

        state = update_boot_state(self.disk, booted)
        assessment = found[-1]
        kind = "committed" if state.slot(slot).ok else "trial"
        self._record("image.boot", state, slot, kind)
        if assessment.failed_slot is not None:
            failed = assessment.failed_slot
            reason = f"slot {failed} ran out of trial boots; booted slot {slot}"
            self._record("image.rollback", state, failed, reason)
            log.warning("rolled back: %s", reason)
        return assessment

    def boot_once(self, slot: Slot, boot_id: str | None) -> Assessment:
        """`boot`, once per kernel boot (`boot_id`): an agent unit restarted on the same
        boot only re-reads the assessment, recording nothing twice."""
        marker = self.image_dir / ASSESSED_FILE
        try:
            assessed = marker.read_text().strip()
        except FileNotFoundError:
            assessed = None
        if boot_id is not None and assessed == boot_id:
            return assess(self.state(), slot)
        assessment = self.boot(slot)
        if boot_id is not None:
            replace_private(marker, boot_id.encode())
        return assessment

    def commit(self, slot: Slot, reason: str = "") -> BootState:
        state = update_boot_state(self.disk, lambda current: mark_good(current, slot))
        self._record("image.commit", state, slot, reason)
        log.info("committed slot %s (%s)", slot, state.slot(slot).version)
        return state

    def fail(self, slot: Slot, reason: str) -> BootState:
        state = update_boot_state(self.disk, lambda current: mark_bad(current, slot))
        self._record("image.mark_bad", state, slot, reason)
        log.warning("marked slot %s bad: %s", slot, reason)
        return state

    def _record(self, event: EventName, state: BootState, slot: Slot, detail: str) -> None:
        record = state.slot(slot)
        record_event(
            self.data_dir,
            event,
            slot=slot,
            version=record.version,
            digest=record.digest,
            detail=detail,
        )


def kernel_boot_id(path: Path = Path("/proc/sys/kernel/random/boot_id")) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def booted_slot_from_cmdline(cmdline: Path = Path("/proc/cmdline")) -> Slot | None:
    """`palisade.slot=A|B`, which grub.cfg puts on the kernel command line."""
    try:
        words = cmdline.read_text().split()
    except OSError:
        return None
    for word in words:
        if word == "palisade.slot=A":
            return "A"
        if word == "palisade.slot=B":
            return "B"
    return None


# --- the update client ------------------------------------------------------------------------


class PendingRollout(msgspec.Struct, kw_only=True):
    """The rollout whose bundle this node flashed, until its outcome is reported."""

    rollout: str
    slot: Slot
    version: str


class FleetChannel:
    """The node's mTLS channel to its router's fleet listener (sync: the agent is a plain
    process, not an event loop)."""

    def __init__(self, credentials: NodeCredentials, fleet_url: str) -> None:
        state = credentials.state
        if state is None or state.router_id is None:
            raise PalisadeError(f"{credentials.home / 'node.toml'} names no router.")
        crl = credentials.crl_path if credentials.crl_path.exists() else None
        tls = client_context(credentials.ca_path, credentials.cert_path, credentials.key_path, crl)
        self.fleet_url = fleet_url.rstrip("/")
        self._router_name = router_dns_name(state.router_id)
        self._client = httpx.Client(timeout=httpx.Timeout(10.0, connect=3.0), verify=tls)

    def close(self) -> None:
        self._client.close()

    def _request(self, method: str, path: str, body: bytes | None = None) -> httpx.Request:
        headers = {"Content-Type": "application/json"} if body is not None else None
        url = f"{self.fleet_url}{path}"
        request = self._client.build_request(method, url, content=body, headers=headers)
        # The router's certificate names its fleet DNS name, whatever address the URL has.
        request.extensions["sni_hostname"] = self._router_name
        return request

    def report(self, report: ImageReport) -> None:
        request = self._request("PUT", "/federation/v1/image", ENCODER.encode(report))
        _check(self._client.send(request), "reporting the image")

    def next_offer(self) -> UpdateOffer | None:
        response = self._client.send(self._request("GET", "/federation/v1/updates/next"))
        if response.status_code == 204:
            return None
        _check(response, "asking for an update")
        return UPDATE_OFFER_DECODER.decode(response.content)

    def download(self, offer: UpdateOffer, target: Path) -> None:
        """Stream the offered bundle to `target` (via `.part`); its size and SHA-256 must be
        the offer's."""
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(target.name + ".part")
        digest, size = hashlib.sha256(), 0
        request = self._request("GET", f"/federation/v1/updates/{offer.rollout}/bundle")
        try:
            response = self._client.send(request, stream=True)
            try:
                _check(response, "downloading the bundle")
                with part.open("wb") as out:
                    for chunk in response.iter_bytes(1 << 20):
                        size += len(chunk)
                        if size > offer.size:
                            break
                        digest.update(chunk)
                        out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
            finally:
                response.close()
            if size != offer.size or digest.hexdigest() != offer.sha256:
                raise ImageError(
                    f"The bundle of rollout {offer.rollout} arrived with {size} bytes and "
                    f"SHA-256 {digest.hexdigest()}, not the {offer.size} bytes and "
                    f"{offer.sha256} offered.",
                    code="download_mismatch",
                )
            part.replace(target)
        finally:
            part.unlink(missing_ok=True)


def _check(response: httpx.Response, what: str) -> None:
    if response.status_code >= 300:
        raise ImageError(
            f"The router refused {what}: HTTP {response.status_code} {response.text[:300]}",
            code="router_refused",
        )


class Updater:
    """Reports this node's image and installs what its router offers."""

    def __init__(self, node: NodeImage, channel: FleetChannel, *, tries: int = 3) -> None:
        self.node = node
        self.channel = channel
        self.tries = tries
        self._failed: set[str] = set()

    @classmethod
    def for_node(cls, node: NodeImage, router_url: str | None = None) -> Updater | None:
        """None for a node that is not enrolled (it has no fleet to update it)."""
        credentials = NodeCredentials.load(node.data_dir)
        if not credentials.enrolled or credentials.state is None:
            return None
        url = router_url or credentials.state.fleet_url
        if url is None:
            return None
        return cls(node, FleetChannel(credentials, url))

    @property
    def pending_path(self) -> Path:
        return self.node.image_dir / PENDING_FILE

    def pending(self) -> PendingRollout | None:
        try:
            return msgspec.json.decode(self.pending_path.read_bytes(), type=PendingRollout)
        except (FileNotFoundError, msgspec.DecodeError):
            return None

    def report(self, booted: Slot, outcome: RolloutOutcome | None = None) -> bool:
        """What this node runs, with the pending rollout's outcome (derived from the boot
        state unless given); whether the router took it. A failure is logged: the next
        report says it again."""
        state = self.node.state()
        record = state.slot(booted)
        pending = self.pending()
        if outcome is None and pending is not None:
            outcome = _outcome_of(pending, state, booted)
        if len(record.digest) != 64 or not record.version:
            log.info("slot %s holds no known image; nothing to report", booted)
            return False
        report = ImageReport(
            version=record.version,
            slot=booted,
            digest=record.digest,
            committed=record.ok,
            outcome=outcome,
        )
        try:
            self.channel.report(report)
        except (httpx.HTTPError, PalisadeError) as exc:
            log.warning("could not report the image to the router: %s", exc)
            return False
        if pending is not None and outcome is not None and _ends(outcome, pending):
            self.pending_path.unlink(missing_ok=True)
        return True

    def check(self, booted: Slot) -> bool:
        """One poll: install an offered bundle; True when the node should reboot into it."""
        try:
            offer = self.channel.next_offer()
        except (httpx.HTTPError, PalisadeError) as exc:
            log.warning("could not ask the router for updates: %s", exc)
            return False
        if offer is None or offer.rollout in self._failed:
            return False
        pending = self.pending()
        if pending is not None and pending.rollout == offer.rollout:
            return self._awaits_reboot(pending, booted)
        if self.node.state().slot(booted).version == offer.version:
            return False  # it runs that version (on trial, still being watched)
        return self.install(offer, booted)

    def _awaits_reboot(self, pending: PendingRollout, booted: Slot) -> bool:
        """Installed, not yet booted (the agent restarted before the reboot)."""
        state = self.node.state()
        installed = state.slot(pending.slot)
        return pending.slot != booted and state.order[0] == pending.slot and installed.bootable

    def install(self, offer: UpdateOffer, booted: Slot) -> bool:
        step = RolloutOutcome(rollout=offer.rollout, state="installing")
        self.report(booted, step)
        bundle = self.node.image_dir / "downloads" / f"{offer.rollout}.pimg"
        try:
            self.channel.download(offer, bundle)
            trust = TrustSet.load(node_trust_file(self.node.data_dir))
            result = flash_bundle(
                bundle, self.node.disk, trust=trust, data_dir=self.node.data_dir,
                tries=self.tries, booted=booted,
            )  # fmt: skip
        except (httpx.HTTPError, PalisadeError, OSError) as exc:
            self._failed.add(offer.rollout)
            code = exc.code if isinstance(exc, ImageError) else type(exc).__name__
            log.warning("installing rollout %s failed: %s", offer.rollout, exc)
            failed = RolloutOutcome(rollout=offer.rollout, state="failed", detail=code[:500])
            self.report(booted, failed)
            return False
        finally:
            bundle.unlink(missing_ok=True)
        record_event(
            self.node.data_dir,
            "image.install",
            slot=result.slot,
            version=result.version,
            digest=result.digest,
            detail=f"rollout {offer.rollout}",
        )
        pending = PendingRollout(rollout=offer.rollout, slot=result.slot, version=result.version)
        replace_private(self.pending_path, msgspec.json.encode(pending))
        self.report(booted, RolloutOutcome(rollout=offer.rollout, state="installed"))
        return True


def _ends(outcome: RolloutOutcome, pending: PendingRollout) -> bool:
    """Whether `outcome` is the pending rollout's last word (nothing more to report)."""
    final = outcome.state in ("committed", "rolled_back", "failed")
    return final and outcome.rollout == pending.rollout


def _outcome_of(pending: PendingRollout, state: BootState, booted: Slot) -> RolloutOutcome:
    record = state.slot(pending.slot)
    if record.status == "bad":
        detail = f"slot {pending.slot} ({pending.version}) failed its trial"
        return RolloutOutcome(rollout=pending.rollout, state="rolled_back", detail=detail)
    if pending.slot == booted:
        step: Literal["committed", "trial"] = "committed" if record.ok else "trial"
        return RolloutOutcome(rollout=pending.rollout, state=step)
    return RolloutOutcome(rollout=pending.rollout, state="installed")
