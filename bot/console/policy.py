"""Who sees and acts on which conversations in the console (roles from bot/auth.py's StaffRole).

- admin: every conversation;
- lead: every conversation of their team;
- agent: their team's queue and the conversations assigned to them; never another team's;
- community: may log in, sees no conversations.

Out-of-scope conversations are answered exactly like missing ones (404), so their existence does not leak.
"""

from __future__ import annotations

from dataclasses import dataclass

from bot.storage.console_repository import Scope
from bot.storage.models import StaffRole


@dataclass(frozen=True, slots=True)
class ConsoleUser:
    """The signed-in staff member, as the console and the actions port see them."""

    id: int
    username: str
    display_name: str
    role: StaffRole
    team: str | None

    @property
    def sees_conversations(self) -> bool:
        return self.role is not StaffRole.COMMUNITY

    @property
    def is_lead(self) -> bool:
        """May open the lead's view (queue depth, SLA attainment)."""
        return self.role in (StaffRole.LEAD, StaffRole.ADMIN)


ROLE_LABELS = {
    StaffRole.ADMIN: "管理员",
    StaffRole.LEAD: "组长",
    StaffRole.AGENT: "客服",
    StaffRole.COMMUNITY: "社群运营",
}


def scope_for(user: ConsoleUser) -> Scope:
    if user.role is StaffRole.ADMIN:
        return Scope(everything=True)
    if user.role is StaffRole.LEAD:
        return Scope(team=user.team, team_all=True)
    if user.role is StaffRole.AGENT:
        return Scope(team=user.team, assignee_id=user.id)
    return Scope(none=True)


def may_see_event(user: ConsoleUser, event: dict[str, object]) -> bool:
    """Whether an inbox change concerns this user; events without a team reach everyone who sees conversations
    (they carry no customer data, only a hint to re-fetch the inbox, which is filtered)."""
    if not user.sees_conversations:
        return False
    if user.role is StaffRole.ADMIN or "team" not in event:
        return True
    if event.get("team") == user.team:
        return True
    assignees = {event.get("assignee_id"), event.get("previous_assignee_id")}
    return user.id in assignees
