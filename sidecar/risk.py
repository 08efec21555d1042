"""Risk rules: conditions that raise an operation's requirement (network, device, hours)."""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
from dataclasses import dataclass
from typing import Protocol
from zoneinfo import ZoneInfo

from sidecar.attributes import RequestAttributes


class Condition(Protocol):
    def fires(self, attrs: RequestAttributes, now: float) -> bool: ...


class SourceNotIn:
    """Fires when the source address is outside every listed network (or unknown)."""

    def __init__(self, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> None:
        self.networks = networks
        # Few distinct peer addresses reach a sidecar: remember the verdict per address (bounded;
        # a function of the networks, not a bound method: no reference cycle).
        self._inside = functools.lru_cache(maxsize=4096)(functools.partial(_inside, networks))

    def fires(self, attrs: RequestAttributes, now: float) -> bool:
        ip = attrs.source_ip
        if len(ip) > 64:  # longer than any address: not one, and not worth a cache entry
            return True
        return not self._inside(ip)



def _inside(networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...], address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False  # an unknown source is an untrusted one
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


@dataclass(frozen=True, slots=True)
class DeviceUnknown:
    header: str
    known: frozenset[str]

    def fires(self, attrs: RequestAttributes, now: float) -> bool:
        value = attrs.headers.get(self.header, "").strip()
        if not value:
            return True
        return bool(self.known) and value not in self.known


_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@dataclass(frozen=True, slots=True)
class OutsideHours:
    zone: ZoneInfo
    days: frozenset[int]  # 0 = Monday
    start: int  # minutes since midnight
    end: int

    def fires(self, attrs: RequestAttributes, now: float) -> bool:
        local = dt.datetime.fromtimestamp(now, self.zone)
        minute = local.hour * 60 + local.minute
        if self.start <= self.end:
            inside = local.weekday() in self.days and self.start <= minute < self.end
        else:  # window across midnight, e.g. 22:00-06:00; the day is the one it started on
            if minute >= self.start:
                inside = local.weekday() in self.days
            elif minute < self.end:
                inside = (local.weekday() - 1) % 7 in self.days
            else:
                inside = False
        return not inside


@dataclass(frozen=True, slots=True)
class RiskRule:
    id: str
    condition: Condition
    raise_by: int
    max_age: int | None


def day_index(name: str) -> int:
    return _DAYS.index(name)
