"""What an override reason named in feedback means: the display the service offered with it and
the HL7 Non-Adherence Reason category it counts under (CDS Hooks 3.0), whether it is one of the
service's own codes (today's or a former one) or an HL7 code."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from cds_service import nonadherence
from cds_service.render import CardTemplates


@dataclass(frozen=True)
class OverrideReasons:
    # the override-reason systems of our cards: today's and those of former canonical bases
    own_systems: frozenset[str] = frozenset()
    # our code -> (the display the cards offer or offered, its Non-Adherence category)
    own: dict[str, tuple[str, str | None]] = field(default_factory=dict)

    @classmethod
    def of(cls, templates: CardTemplates, own_systems: Iterable[str]) -> OverrideReasons:
        """Today's reasons of every card kind (the first display of a code wins), then the
        former ones, counted under the category of the HL7 code that replaced each."""
        own: dict[str, tuple[str, str | None]] = {}
        for kind in templates.kinds.values():
            for r in kind.override_reasons:
                own.setdefault(r["code"], (r["display"], r.get("category")))
        for r in templates.former_reasons:
            own.setdefault(r["code"], (r["display"], nonadherence.category_of(r["now"])))
        return cls(frozenset(own_systems), own)

    def ours(self, system: str | None) -> bool:
        """Whether a reason of that system is one of ours (no system: taken to be ours, as the
        sandbox sends them)."""
        return system is None or system in self.own_systems

    def display(self, system: str | None, code: str | None) -> str | None:
        """The display the service offers (or offered) with a code, None if it is not ours."""
        return self._look(system, code, 0, nonadherence.display_of)

    def category(self, system: str | None, code: str | None) -> str | None:
        """The Non-Adherence Reason category a reason counts under, None if it has none."""
        return self._look(system, code, 1, nonadherence.category_of)

    def _look(self, system: str | None, code: str | None, at: int,
              standard: Callable[[str | None], str | None]) -> str | None:
        """An HL7 code's own value; one of ours from the cards (a code sent with no system
        that is not ours is read as an HL7 code); None for another system's."""
        if system == nonadherence.SYSTEM:
            return standard(code)
        if not self.ours(system):
            return None
        own = self.own.get(code or "")
        return own[at] if own else (standard(code) if system is None else None)
