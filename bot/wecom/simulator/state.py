"""Everything the simulator remembers; tests may read it directly through `SIM_STATE`."""

from __future__ import annotations

import asyncio
import datetime
import itertools
import secrets
import string
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from handlers.domain import Clock

from .config import SimulatorConfig

# Tencent counts calendar months in China time, whatever zone the caller is in.
CHINA_UTC_OFFSET_S = 8 * 3600

KF_SESSION_NEW = 0
KF_SESSION_BOT = 1
KF_SESSION_QUEUE = 2
KF_SESSION_HUMAN = 3
KF_SESSION_ENDED = 4

# Reference §4.1, as the official per-state prose puts it; 3→3 is a transfer between servicers.
KF_TRANSITIONS: frozenset[tuple[int, int]] = frozenset({(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3), (3, 3), (3, 4)})

KF_WINDOW_S = 48 * 3600
KF_QUOTA_PER_CUSTOMER_MSG = 5
KF_SYNC_TOKEN_TTL_S = 600
KF_SHORT_CODE_TTL_S = 20
WELCOME_CODE_TTL_S = 20


@dataclass(slots=True)
class IssuedToken:
    token: str
    secret: str
    label: str
    issued_at: float
    expires_at: float
    revoked: bool = False


@dataclass(slots=True)
class SentRecord:
    """One outbound message as WeCom saw it; `status` says what became of it."""

    seq: int
    at: float
    api: str
    recipient: str
    account: str
    msgtype: str
    content: dict[str, Any]
    accepted: bool
    errcode: int
    # delivered | dropped (over a silent rate limit) | duplicate (suppressed) | rejected | pending (群发 task)
    status: str
    msgid: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "at": self.at,
            "api": self.api,
            "recipient": self.recipient,
            "account": self.account,
            "msgtype": self.msgtype,
            "content": self.content,
            "accepted": self.accepted,
            "errcode": self.errcode,
            "status": self.status,
            "msgid": self.msgid,
        }


@dataclass(slots=True)
class Fault:
    id: int
    path: str
    remaining: int
    errcode: int | None = None
    http_status: int | None = None
    delay_s: float | None = None
    # WeCom did the work but the answer is late (or never arrives, if the caller dies meanwhile).
    hold_response_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "path": self.path,
            "remaining": self.remaining,
            "errcode": self.errcode,
            "http_status": self.http_status,
            "delay_s": self.delay_s,
            "hold_response_s": self.hold_response_s,
        }


@dataclass(slots=True)
class ApiCall:
    seq: int
    at: float
    method: str
    path: str
    http_status: int
    errcode: int | None

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "at": self.at,
            "method": self.method,
            "path": self.path,
            "http_status": self.http_status,
            "errcode": self.errcode,
        }


@dataclass(slots=True)
class CallbackAttempt:
    at: float
    status: int | None
    latency_s: float
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at, "status": self.status, "latency_s": self.latency_s, "error": self.error}


@dataclass(slots=True)
class CallbackDelivery:
    """One callback POST (with its retries); `query` and `body` are kept so it can be re-sent verbatim."""

    id: int
    kind: str
    plaintext: str
    query: dict[str, str]
    body: str
    url: str | None
    redelivery_of: int | None = None
    attempts: list[CallbackAttempt] = field(default_factory=list)
    # pending | delivered | failed | no_callback_url
    outcome: str = "pending"
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "url": self.url,
            "plaintext": self.plaintext,
            "query": self.query,
            "redelivery_of": self.redelivery_of,
            "outcome": self.outcome,
            "attempts": [a.to_json() for a in self.attempts],
        }


@dataclass(slots=True)
class KfSession:
    state: int = KF_SESSION_ENDED
    servicer_userid: str = ""
    last_customer_msg_at: float | None = None
    sent_since_customer_msg: int = 0
    # states (2, 3) that already produced a msg_code in this session: only the first move yields one
    code_states: set[int] = field(default_factory=set)
    has_messaged: bool = False
    last_welcome_at: float | None = None


@dataclass(slots=True)
class KfMsgCode:
    code: str
    kind: str  # welcome | queue | human | end
    open_kfid: str
    external_userid: str
    expires_at: float
    # the session state the code belongs to; None for welcome codes, which ignore the state
    state_at_issue: int | None
    used: bool = False


@dataclass(slots=True)
class KfStoredMessage:
    seq: int
    open_kfid: str
    item: dict[str, Any]


@dataclass(slots=True)
class Follow:
    userid: str
    createtime: int
    state: str = ""
    remark: str = ""
    tags: set[str] = field(default_factory=set)


@dataclass(slots=True)
class ExternalContact:
    external_userid: str
    name: str
    followers: dict[str, Follow] = field(default_factory=dict)


@dataclass(slots=True)
class WelcomeCode:
    code: str
    userid: str
    external_userid: str
    expires_at: float
    used: bool = False


@dataclass(slots=True)
class CorpTag:
    id: str
    name: str
    group_id: str
    group_name: str
    order: int
    create_time: int


@dataclass(slots=True)
class GroupMsgTask:
    msgid: str
    chat_type: str  # single | group
    sender: str
    created_at: float
    text: dict[str, Any] | None
    attachments: list[Any]
    # recipient (external_userid or chat_id) -> status 0 unsent, 1 sent, 2 not a friend, 3 over the month cap
    recipients: dict[str, int]
    # recipient -> the member whose client must confirm the send
    assignee: dict[str, str]
    fail_list: list[str]
    sent_at: dict[str, float] = field(default_factory=dict)
    confirmed_at: float | None = None


class SlidingWindow:
    """Events in the last `span_s` seconds, by the injected clock."""

    def __init__(self, span_s: float) -> None:
        self.span_s = span_s
        self._events: dict[str, deque[float]] = {}

    def count(self, key: str, now: float) -> int:
        events = self._events.get(key)
        if events is None:
            return 0
        while events and events[0] <= now - self.span_s:
            events.popleft()
        return len(events)

    def add(self, key: str, now: float) -> None:
        self._events.setdefault(key, deque()).append(now)


def china_month(ts: float) -> str:
    day = datetime.datetime.fromtimestamp(ts + CHINA_UTC_OFFSET_S, tz=datetime.UTC)
    return f"{day.year:04d}-{day.month:02d}"


_TOKEN_ALPHABET = string.ascii_letters + string.digits + "-_"


def random_token(length: int) -> str:
    return "".join(secrets.choice(_TOKEN_ALPHABET) for _ in range(length))


class SimulatorState:
    """All simulator state; mutated only on the event loop, so no locks are needed."""

    def __init__(self, config: SimulatorConfig, clock: Clock) -> None:
        self.config = config
        self.clock = clock
        self.callback_url: str | None = config.callback_url
        self._ids = itertools.count(1)

        self.tokens: dict[str, IssuedToken] = {}
        self.current_token_by_secret: dict[str, str] = {}

        self.sent: list[SentRecord] = []
        self._sent_changed = asyncio.Event()
        self.calls: list[ApiCall] = []
        # Every accepted kf service_state/trans: (time, open_kfid, external_userid, new state, servicer_userid).
        self.kf_transitions: list[tuple[float, str, str, int, str]] = []
        self.faults: list[Fault] = []
        # API requests currently being answered (held by a delay fault, say); tests wait for zero.
        self.in_flight = 0
        self.deliveries: list[CallbackDelivery] = []

        self.kf_sessions: dict[tuple[str, str], KfSession] = {}
        self.kf_servicer_status: dict[tuple[str, str], tuple[int, int]] = {}
        self.kf_messages: list[KfStoredMessage] = []
        self.kf_used_msgids: dict[str, set[str]] = {kfid: set() for kfid in config.kf_accounts}
        self.kf_codes: dict[str, KfMsgCode] = {}
        self.kf_sync_tokens: dict[str, tuple[str, float]] = {}  # token -> (open_kfid, expires_at)
        self.kf_sync_page_size: int | None = None
        self.kf_sync_empty_pages = 0

        self.app_rate_minute = SlidingWindow(60)
        self.app_rate_hour = SlidingWindow(3600)
        self.app_recent: dict[str, tuple[float, str]] = {}  # dedupe key -> (sent at, msgid)
        self.robot_rate = SlidingWindow(60)

        self.contacts: dict[str, ExternalContact] = {}
        self.welcome_codes: dict[str, WelcomeCode] = {}
        self.corp_tags: dict[str, CorpTag] = {}
        self.groupmsg_tasks: dict[str, GroupMsgTask] = {}
        self.groupmsg_month_count: dict[tuple[str, str], int] = {}  # (recipient, month) -> count
        self._init_tags()

        # Background deliveries are tracked so app cleanup can cancel them instead of leaking tasks.
        self.tasks: set[asyncio.Task[None]] = set()
        self.http: aiohttp.ClientSession | None = None

    def _init_tags(self) -> None:
        created = int(self.clock.now())
        for g, (group_name, names) in enumerate(self.config.corp_tags.items(), start=1):
            group_id = f"etGROUP{g:04d}"
            for t, name in enumerate(names, start=1):
                tag_id = f"etTAG{g:04d}{t:04d}"
                self.corp_tags[tag_id] = CorpTag(tag_id, name, group_id, group_name, t, created)

    # ---- ids and time

    def now(self) -> float:
        return self.clock.now()

    def next_id(self) -> int:
        return next(self._ids)

    # ---- outbound log

    def record_sent(
        self,
        *,
        api: str,
        recipient: str,
        account: str,
        msgtype: str,
        content: dict[str, Any],
        errcode: int,
        status: str,
        msgid: str = "",
    ) -> SentRecord:
        record = SentRecord(
            seq=len(self.sent) + 1,
            at=self.now(),
            api=api,
            recipient=recipient,
            account=account,
            msgtype=msgtype,
            content=content,
            accepted=errcode == 0,
            errcode=errcode,
            status=status,
            msgid=msgid,
        )
        self.sent.append(record)
        # Waking every waiter and handing out a fresh event is simpler than a Condition and needs no lock.
        self._sent_changed.set()
        self._sent_changed = asyncio.Event()
        return record

    def sent_after(self, after: int = 0, recipient: str | None = None, api: str | None = None) -> list[SentRecord]:
        return [
            r
            for r in self.sent[after:]
            if (recipient is None or r.recipient == recipient) and (api is None or r.api == api)
        ]

    async def wait_sent(
        self,
        after: int = 0,
        *,
        count: int = 1,
        wait_s: float = 5.0,
        recipient: str | None = None,
        api: str | None = None,
    ) -> list[SentRecord]:
        """Records after sequence `after` once at least `count` match, or whatever matched after `wait_s`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            found = self.sent_after(after, recipient, api)
            remaining = deadline - loop.time()
            if len(found) >= count or remaining <= 0:
                return found
            event = self._sent_changed
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except TimeoutError:
                return self.sent_after(after, recipient, api)

    def record_call(self, method: str, path: str, http_status: int, errcode: int | None) -> None:
        self.calls.append(ApiCall(len(self.calls) + 1, self.now(), method, path, http_status, errcode))

    # ---- tokens

    def issue_token(self, secret: str, label: str) -> IssuedToken:
        now = self.now()
        current = self.tokens.get(self.current_token_by_secret.get(secret, ""))
        if current is not None and not current.revoked and current.expires_at > now:
            return current
        issued = IssuedToken(random_token(64), secret, label, now, now + self.config.token_ttl_s)
        self.tokens[issued.token] = issued
        self.current_token_by_secret[secret] = issued.token
        return issued

    def invalidate_tokens(self) -> int:
        count = 0
        for issued in self.tokens.values():
            if not issued.revoked:
                issued.revoked = True
                count += 1
        return count

    # ---- faults

    def take_fault(self, path: str) -> Fault | None:
        for fault in self.faults:
            if fault.path == path and fault.remaining > 0:
                fault.remaining -= 1
                if fault.remaining == 0:
                    self.faults.remove(fault)
                return fault
        return None

    # ---- kf

    def kf_session(self, open_kfid: str, external_userid: str) -> KfSession:
        return self.kf_sessions.setdefault((open_kfid, external_userid), KfSession())

    def servicer_status(self, open_kfid: str, userid: str) -> tuple[int, int]:
        """(status, stop_type): status 0 receiving, 1 stopped; stop_type 0 stopped, 1 suspended."""
        return self.kf_servicer_status.get((open_kfid, userid), (0, 0))

    def new_kf_code(
        self, kind: str, open_kfid: str, external_userid: str, ttl_s: float, state_at_issue: int | None
    ) -> KfMsgCode:
        code = KfMsgCode(random_token(40), kind, open_kfid, external_userid, self.now() + ttl_s, state_at_issue)
        self.kf_codes[code.code] = code
        return code

    def new_sync_token(self, open_kfid: str) -> str:
        token = "ENC" + random_token(44)
        self.kf_sync_tokens[token] = (open_kfid, self.now() + KF_SYNC_TOKEN_TTL_S)
        return token

    def store_kf_message(self, open_kfid: str, item: dict[str, Any]) -> KfStoredMessage:
        stored = KfStoredMessage(len(self.kf_messages), open_kfid, item)
        self.kf_messages.append(stored)
        return stored

    def kf_msgid(self) -> str:
        return f"from_msgid_{secrets.randbelow(9 * 10**18) + 10**18}"


SIM_STATE: web.AppKey[SimulatorState] = web.AppKey("wecom_simulator_state", SimulatorState)
