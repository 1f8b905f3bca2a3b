"""WeCom corp tags as a customer tag source (issue 3 item 5a; reference §5.6, §5.7).

`CorpTagSyncer.sync_customer(external_userid)` reads `externalcontact/get` (every page of `follow_user`), keeps
the corp tags (type 1) any following member put on the contact, and stores their names as the customer's
`TagSource.WECOM` tags (ids in `customers.corp_tag_ids`). WeCom gives a WeChat user the same external_userid in
客户联系 and 微信客服, so the tags go on every kf and contact row of that id; the contact row is created when
missing (as the order import does). Error 84061 (no contact relationship) clears the WeCom tags.

`write_back(userid, external_userid, add=[names], remove=[names])` maps tag names to corp tag ids through
`get_corp_tag_list` (cached for `tag_list_ttl_s`; refreshed once when a name is unknown or WeCom calls an id
invalid) and calls `mark_tag`. Logs name no customer: ids and counts only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import structlog
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.storage.models import Customer
from bot.storage.repositories import Repositories
from bot.storage.tags_repository import MAX_TAG_CHARS, TAGGED_CHANNELS, upsert_contact_customer
from bot.wecom.errors import WeComApiError
from handlers.domain import Channel, Clock, SystemClock
from handlers.tags import TagSource

log = structlog.get_logger(__name__)

NO_CONTACT_RELATION = 84061  # externalcontact/get, mark_tag: the member and the customer are not contacts
INVALID_TAG_ID = 40068  # mark_tag: a tag id that does not (or no longer) exist
CORP_TAG_TYPE = 1  # follow_user[].tags[].type: 1 corp tag, 2 personal tag
MAX_FOLLOW_PAGES = 100  # 500 followers a page (§5.7): far beyond any real contact; stops a cursor loop
DEFAULT_TAG_LIST_TTL_S = 300.0
DEFAULT_SYNCED_TTL_S = 6 * 3600.0
DEFAULT_SYNCED_MEMO_SIZE = 100_000


class CorpTagApi(Protocol):
    """The part of `bot.wecom.client.WeComClient` the syncer uses (a token whose secret may call 客户联系)."""

    async def externalcontact_get(self, external_userid: str, cursor: str | None = None) -> dict[str, Any]: ...

    async def get_corp_tag_list(self, tag_id: Iterable[str] = (), group_id: Iterable[str] = ()) -> dict[str, Any]: ...

    async def mark_tag(
        self, userid: str, external_userid: str, add_tag: Iterable[str] = (), remove_tag: Iterable[str] = ()
    ) -> dict[str, Any]: ...


class UnknownCorpTagError(ValueError):
    """A tag name with no corp tag in WeCom (after refreshing the tag list), or one naming several."""

    def __init__(self, unknown: Sequence[str], ambiguous: Sequence[str] = ()) -> None:
        self.unknown = tuple(unknown)
        self.ambiguous = tuple(ambiguous)
        parts = []
        if self.unknown:
            parts.append(f"no corp tag named {', '.join(self.unknown)}")
        if self.ambiguous:
            parts.append(f"several corp tags named {', '.join(self.ambiguous)}")
        super().__init__("; ".join(parts))


@dataclass(frozen=True, slots=True)
class CorpTags:
    """What WeCom says is on one external contact: corp tag names and ids (empty when no relation)."""

    names: frozenset[str]
    ids: tuple[str, ...]
    related: bool  # False when WeCom answered 84061


@dataclass(frozen=True, slots=True)
class SyncResult:
    tags: CorpTags
    customer_ids: tuple[int, ...]  # the rows that were updated


def _corp_tags(follow_users: Iterable[Any]) -> tuple[frozenset[str], tuple[str, ...]]:
    names: set[str] = set()
    ids: set[str] = set()
    for follow in follow_users:
        tags = follow.get("tags") if isinstance(follow, Mapping) else None
        for tag in tags if isinstance(tags, list) else ():
            if not isinstance(tag, Mapping) or tag.get("type", CORP_TAG_TYPE) != CORP_TAG_TYPE:
                continue
            name = str(tag.get("tag_name") or "").strip()
            if not name or len(name) > MAX_TAG_CHARS:
                continue  # WeCom caps names at 30 characters; anything else is not a usable tag
            names.add(name)
            tag_id = tag.get("tag_id")
            if isinstance(tag_id, str) and tag_id:
                ids.add(tag_id)
    return frozenset(names), tuple(sorted(ids))


class CorpTagSyncer:
    """Reads corp tags from WeCom into storage and writes bot-set tags back; safe to share across tasks."""

    def __init__(
        self,
        api: CorpTagApi,
        repos: Repositories,
        sessions: async_sessionmaker[AsyncSession],
        *,
        clock: Clock | None = None,
        tag_list_ttl_s: float = DEFAULT_TAG_LIST_TTL_S,
        synced_ttl_s: float = DEFAULT_SYNCED_TTL_S,
        synced_memo_size: int = DEFAULT_SYNCED_MEMO_SIZE,
    ) -> None:
        self._api = api
        self._repos = repos
        self._sessions = sessions
        self._clock = clock or SystemClock()
        self._tag_list_ttl_s = tag_list_ttl_s
        self._tag_list: dict[str, tuple[str, ...]] | None = None  # name -> ids
        self._tag_list_at = 0.0
        self._synced_ttl_s = synced_ttl_s
        self._synced_memo_size = synced_memo_size
        self._synced: dict[str, float] = {}  # external_userid -> clock time of the last sync here

    # --- read: WeCom → storage --------------------------------------------------------------------

    async def fetch_corp_tags(self, external_userid: str) -> CorpTags:
        """The corp tags on the contact, over every follow_user page; 84061 is an empty, unrelated answer."""
        follow_users: list[Any] = []
        cursor: str | None = None
        seen: set[str] = set()
        for _ in range(MAX_FOLLOW_PAGES):
            try:
                page = await self._api.externalcontact_get(external_userid, cursor)
            except WeComApiError as exc:
                if exc.errcode == NO_CONTACT_RELATION:
                    return CorpTags(frozenset(), (), related=False)
                raise
            follow = page.get("follow_user")
            if isinstance(follow, list):
                follow_users.extend(follow)
            next_cursor = page.get("next_cursor")
            if not isinstance(next_cursor, str) or not next_cursor or next_cursor in seen:
                break
            seen.add(next_cursor)
            cursor = next_cursor
        else:
            log.warning("externalcontact/get paging stopped at the page limit", pages=MAX_FOLLOW_PAGES)
        names, ids = _corp_tags(follow_users)
        return CorpTags(names, ids, related=True)

    async def sync_customer(self, external_userid: str) -> SyncResult:
        """Fetch the contact's corp tags and make them the WECOM tags of every row of that external_userid."""
        tags = await self.fetch_corp_tags(external_userid)
        async with self._sessions.begin() as session:  # one transaction: the rows and all their tags
            customer_ids = await self._rows(session, external_userid, create_contact=tags.related)
            for customer_id in customer_ids:
                await self._repos.tags.replace_in(session, customer_id, TagSource.WECOM, tags.names)
                await session.execute(
                    update(Customer).where(Customer.id == customer_id).values(corp_tag_ids=list(tags.ids))
                )
        self._remember(external_userid)
        log.info(
            "corp tags synced",
            related=tags.related,
            tags=len(tags.names),
            customer_ids=list(customer_ids),
        )
        return SyncResult(tags, customer_ids)

    async def sync_if_never_synced(self, customer_id: int, external_userid: str) -> bool:
        """Sync unless this customer was synced lately (this process) or already has WeCom tags; True if synced.

        Cheap on the hot path: an in-memory hit costs nothing, a miss one indexed query; only a customer
        without WeCom tags and not synced here within `synced_ttl_s` costs a WeCom call.
        """
        if self._recently_synced(external_userid):
            return False
        by_source = await self._repos.tags.tags_by_source(customer_id)
        if TagSource.WECOM in by_source:
            self._remember(external_userid)
            return False
        await self.sync_customer(external_userid)
        return True

    def _recently_synced(self, external_userid: str) -> bool:
        at = self._synced.get(external_userid)
        return at is not None and self._clock.now() - at < self._synced_ttl_s

    def _remember(self, external_userid: str) -> None:
        if len(self._synced) >= self._synced_memo_size:
            # Drop the oldest half (dicts keep insertion order; a re-sync re-inserts at the end).
            for key in list(self._synced)[: self._synced_memo_size // 2]:
                del self._synced[key]
        self._synced.pop(external_userid, None)
        self._synced[external_userid] = self._clock.now()

    async def _rows(self, session: AsyncSession, external_userid: str, *, create_contact: bool) -> tuple[int, ...]:
        """Ids of the kf and contact rows of external_userid; the contact row is created when asked and absent."""
        rows = (
            await session.execute(
                select(Customer.id, Customer.channel).where(
                    Customer.external_id == external_userid, Customer.channel.in_(TAGGED_CHANNELS)
                )
            )
        ).all()
        ids = {int(r.id) for r in rows}
        if create_contact and Channel.CONTACT.value not in {r.channel for r in rows}:
            now = datetime.fromtimestamp(self._clock.now(), UTC)
            ids.add(await upsert_contact_customer(session, external_userid, now))
        return tuple(sorted(ids))

    # --- write: bot → WeCom -----------------------------------------------------------------------

    def invalidate_tag_list(self) -> None:
        """Forget the cached corp tag list (a change_external_tag event says the definitions changed)."""
        self._tag_list = None

    async def _tag_ids_by_name(self, *, refresh: bool = False) -> dict[str, tuple[str, ...]]:
        now = self._clock.now()
        if refresh or self._tag_list is None or now - self._tag_list_at >= self._tag_list_ttl_s:
            answer = await self._api.get_corp_tag_list()
            by_name: dict[str, list[str]] = {}
            for group in answer.get("tag_group") or ():
                if not isinstance(group, Mapping) or group.get("deleted"):
                    continue
                for tag in group.get("tag") or ():
                    if not isinstance(tag, Mapping) or tag.get("deleted"):
                        continue
                    name, tag_id = str(tag.get("name") or "").strip(), tag.get("id")
                    if name and isinstance(tag_id, str) and tag_id:
                        by_name.setdefault(name, []).append(tag_id)
            self._tag_list = {name: tuple(ids) for name, ids in by_name.items()}
            self._tag_list_at = now
        return self._tag_list

    async def resolve_tag_ids(
        self, add: Iterable[str], remove: Iterable[str], *, refresh: bool = False
    ) -> tuple[list[str], list[str]]:
        """Corp tag ids for names to add and remove; raises UnknownCorpTagError (after one refresh)."""
        add_names = sorted({n.strip() for n in add if n.strip()})
        remove_names = sorted({n.strip() for n in remove if n.strip()})
        table = await self._tag_ids_by_name(refresh=refresh)
        if not refresh and any(n not in table for n in (*add_names, *remove_names)):
            table = await self._tag_ids_by_name(refresh=True)  # a tag created since the list was cached
        unknown = [n for n in add_names if n not in table]
        ambiguous = [n for n in add_names if len(table.get(n, ())) > 1]
        if unknown or ambiguous:
            raise UnknownCorpTagError(unknown, ambiguous)
        add_ids = [table[n][0] for n in add_names]
        # Removing a name removes every corp tag of that name; a name WeCom does not know is already absent.
        remove_ids = sorted({i for n in remove_names for i in table.get(n, ())} - set(add_ids))
        return add_ids, remove_ids

    async def write_back(
        self, userid: str, external_userid: str, add: Iterable[str] = (), remove: Iterable[str] = ()
    ) -> tuple[list[str], list[str]]:
        """Put bot-set tags on the contact as `userid` sees it (mark_tag); returns the (add, remove) ids sent."""
        add, remove = list(add), list(remove)
        add_ids, remove_ids = await self.resolve_tag_ids(add, remove)
        if not add_ids and not remove_ids:
            return [], []
        try:
            await self._api.mark_tag(userid, external_userid, add_ids, remove_ids)
        except WeComApiError as exc:
            if exc.errcode != INVALID_TAG_ID:
                raise
            # The cached list named a tag deleted since: refresh and try once more.
            add_ids, remove_ids = await self.resolve_tag_ids(add, remove, refresh=True)
            if not add_ids and not remove_ids:
                return [], []
            await self._api.mark_tag(userid, external_userid, add_ids, remove_ids)
        log.info("corp tags written back", added=len(add_ids), removed=len(remove_ids))
        return add_ids, remove_ids
