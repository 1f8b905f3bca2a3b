"""What a worker does with one queue entry: persist, dispatch, send each reply once, then mark handled."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

import structlog

from bot.outbound import reply_idempotency_key
from bot.queue import MalformedEntry, QueueEntry
from bot.storage.handoff_repository import WITH_HUMANS, HandoffConversation
from bot.storage.models import AnswerStatus, ConversationStatus, MessageStatus
from bot.storage.repositories import InboundRecord, Repositories
from bot.wecom.errors import WeComApiError
from bot.wecom.parse import CallbackParseError, kf_message_to_inbound, parse_plaintext, to_inbound
from handlers.csat import is_survey_answer
from handlers.dispatcher import Dispatcher
from handlers.domain import Channel, Clock, HandlerContext, InboundMessage, KfOrigin, OutboundMessage
from handlers.handoff import (
    HandoffReason,
    HandoffTrigger,
    HandoffTriggers,
    handoff_script_ids,
    is_customer_text,
    next_no_match_streak,
    no_match_script_ids,
    no_match_trigger,
    tag_policy_trigger,
    text_trigger,
)
from handlers.intent import HANDOFF_LABEL, IntentClassifier, intent_candidates, routed_replies, wants_routing
from handlers.subscription import DEFAULT_SUBSCRIPTION, SubscriptionConfig, subscription_command
from handlers.tags import TagConfig, TagSource, recompute_due_on_inbound
from scripts_library import Matcher

log = structlog.get_logger(__name__)

# kf/send_msg rejects a msgid already used in the account (reference §4.3). Which errcode real WeCom uses is not
# documented (reference open question 5); 40058 (invalid parameter) is our reading, and the simulator's.
DUPLICATE_MSGID_ERRCODE = 40058

# kf/send_msg: at most 5 messages per customer message (reference §4.3).
KF_MAX_REPLIES_PER_MESSAGE = 5
# kf/send_msg is allowed only in service states 0 and 1 (reference §4.1, §4.3): pool, human, ended are not ours.
KF_STATES_WITHOUT_BOT_SENDS = frozenset({2, 3, 4})


# 客户联系 changes after which the contact's corp tags are read again, before dispatch (so a welcome sees them).
CONTACT_TAG_SYNC_CHANGES = frozenset({"add_external_contact", "edit_external_contact", "add_half_external_contact"})
TAG_DEFINITIONS_EVENT = "change_external_tag"  # corp tags or groups created, renamed, deleted, reordered (§3.2)
# A sync runs before the welcome, whose code lives 20 s (§5.5): it gets a bounded share of that.
TAG_SYNC_TIMEOUT_S = 5.0
KF_ENTER_SESSION = "enter_session"
CONTACT_ADDED = "add_external_contact"

# Why computed tags are recomputed before dispatch (also the `reason` of the "computed tags changed" log).
RECOMPUTE_ON_INBOUND = "inbound"  # the customer wrote: a silent or churned customer is active again
RECOMPUTE_ON_ENTER_SESSION = "enter_session"  # a kf customer never computed opens the chat
RECOMPUTE_ON_CONTACT_ADDED = "contact_added"  # a member added the customer (新用户 when first seen now)


class ReplySender(Protocol):
    async def send(self, reply: OutboundMessage, idempotency_key: str, *, resend: bool = False) -> str | None: ...


class KfPullPort(Protocol):
    async def pull(self, open_kfid: str, token: str) -> int: ...


class TagSyncPort(Protocol):
    """WeCom corp tags into the customer's tags (bot.tag_sync.CorpTagSyncer)."""

    async def sync_customer(self, external_userid: str) -> object: ...

    async def sync_if_never_synced(self, customer_id: int, external_userid: str) -> bool: ...

    def invalidate_tag_list(self) -> None: ...


# Handler names stored on messages the handoff path handled instead of the dispatcher.
QUIET_HANDLER = "handoff_quiet"  # the customer wrote while people have the conversation: the bot stays quiet
HANDOFF_HANDLER = "handoff"  # a tag policy sent the customer straight to a person
SERVICER_HANDLER = "servicer_line"  # a servicer wrote from the WeCom client (kf origin 5)
CSAT_HANDLER = "csat_answer"  # the customer clicked a satisfaction-survey item (menu_id csat:N)
SUBSCRIPTION_HANDLER = "subscription"  # the customer opted out of (退订) or back into (订阅) marketing sends
INTENT_HANDLER = "llm_intent"  # keywords matched nothing; the LLM intent router chose a script or a handoff

KF_SESSION_STATUS_CHANGE = "session_status_change"
KF_SESSION_ENDED_BY_SERVICER = "3"  # change_type 3: a servicer ended the session; msg_code for a closing/survey


class CsatAnswerPort(Protocol):
    """What the pipeline reads back from a recorded survey click (bot.csat.CsatAnswer)."""

    @property
    def recorded(self) -> bool: ...

    @property
    def thanks(self) -> str | None: ...


class CsatPort(Protocol):
    """The satisfaction survey (bot.csat.CsatService), as the pipeline uses it."""

    async def ask(
        self, conversation_id: int, end_msg_code: str | None, *, code_issued_at: float | None = None
    ) -> object: ...

    async def record_answer(self, message: InboundMessage, customer_id: int) -> CsatAnswerPort: ...


class HandoffPort(Protocol):
    """Handoff to people (bot.handoff.HandoffService), as the pipeline uses it."""

    @property
    def triggers(self) -> HandoffTriggers: ...

    async def conversation(self, conversation_id: int) -> HandoffConversation | None: ...

    async def handoff(
        self, conversation_id: int, trigger: HandoffTrigger, *, defer_out_of_hours: bool = False
    ) -> Any: ...

    async def customer_wrote(self, conversation: HandoffConversation, at: float) -> None: ...

    async def servicer_wrote(
        self, conversation: HandoffConversation, servicer_userid: str | None, at: float
    ) -> None: ...

    async def no_match_run(
        self, conversation: HandoffConversation, before_message_id: int, no_match_scripts: frozenset[str]
    ) -> int: ...

    async def set_no_match_streak(self, conversation_id: int, streak: int) -> None: ...

    async def kf_event(self, message: InboundMessage, conversation: HandoffConversation | None) -> None: ...


class SubscriptionPort(Protocol):
    """Where opt-out state is stored (bot.storage.subscription_repository.SubscriptionRepository)."""

    async def set_opted_out(self, customer_id: int, opted_out: bool, *, at: float | None = None, source: str) -> bool:
        ...


class ScriptSource(Protocol):
    """Where the current script library comes from (bot.app.ScriptBook); read once per message."""

    @property
    def matcher(self) -> Matcher: ...


class Pipeline:
    """Turns queue entries into handled messages; safe to run again on the same entry."""

    def __init__(
        self,
        repos: Repositories,
        dispatcher: Dispatcher,
        sender: ReplySender,
        kf_puller: KfPullPort,
        clock: Clock,
        *,
        scripts: ScriptSource | None = None,
        tag_syncer: TagSyncPort | None = None,
        tag_sync_timeout_s: float = TAG_SYNC_TIMEOUT_S,
        tag_config: TagConfig | None = None,
        handoff: HandoffPort | None = None,
        csat: CsatPort | None = None,
        subscriptions: SubscriptionPort | None = None,
        subscription_config: SubscriptionConfig = DEFAULT_SUBSCRIPTION,
        intent: IntentClassifier | None = None,
    ) -> None:
        self._repos = repos
        self._dispatcher = dispatcher
        self._sender = sender
        self._kf_puller = kf_puller
        self._clock = clock
        self._scripts = scripts
        self._tag_syncer = tag_syncer
        self._tag_sync_timeout_s = tag_sync_timeout_s
        self._tag_config = tag_config  # None: computed tags change only by the daily job and order imports
        self._handoff = handoff  # None: no handoff (the bot answers everything, as before)
        self._csat = csat  # None: no satisfaction survey (a csat:N click is then an ordinary text)
        self._subscriptions = subscriptions  # None: 退订/订阅 are ordinary texts
        self._subscription_config = subscription_config
        self._intent = intent  # None: LLM assist off (text keywords miss → the no-match fallback, as before)

    async def process(self, entry: QueueEntry) -> None:
        """Handle one entry; raising leaves it pending so the worker retries (then dead-letters) it."""
        if entry.kind == "kf_pull":
            await self._kf_puller.pull(str(entry.payload["open_kfid"]), str(entry.payload["token"]))
            return
        message = self._decode(entry)
        await self.handle(message)

    def _decode(self, entry: QueueEntry) -> InboundMessage:
        try:
            if entry.kind == "callback":
                return to_inbound(parse_plaintext(str(entry.payload["xml"])))
            if entry.kind == "kf_message":
                msg = entry.payload["msg"]
                if not isinstance(msg, Mapping):
                    raise MalformedEntry("kf_message payload has no msg object")
                return kf_message_to_inbound(msg)
        except (CallbackParseError, KeyError, TypeError, ValueError) as exc:
            raise MalformedEntry(f"{entry.kind}: {type(exc).__name__}") from None
        raise MalformedEntry(f"unknown entry kind {entry.kind!r}")

    async def handle(self, message: InboundMessage) -> None:
        """Persist, dispatch and reply; a message already handled is left alone."""
        messages = self._repos.messages
        record = await messages.record_inbound(message)
        if record.handled:
            return
        bound = log.bind(channel=message.channel.value, msgtype=message.msgtype, message_id=record.id)
        if message.msgtype == "unknown":
            bound.info("unknown message type stored", wecom_type=_wecom_type(message.raw))
            await messages.mark_status(record.id, MessageStatus.UNKNOWN)
            return
        if self._csat is not None and self._is_survey_answer(message, record):
            await self._survey_answer(self._csat, message, record)
            await messages.mark_handled(record.id, CSAT_HANDLER)
            bound.info("message handled", handler=CSAT_HANDLER)
            return
        await self._sync_corp_tags(message, record)
        tags = await self._customer_tags(message, record)
        conversation = await self._handoff_conversation(message, record)
        handoff = self._handoff
        if (
            conversation is None
            and handoff is not None
            and message.channel is Channel.KF
            and message.msgtype == "event"
        ):
            await handoff.kf_event(message, None)  # servicer_status_change has no customer, so no conversation
        if await self._subscription(message, record, conversation):
            await messages.mark_handled(record.id, SUBSCRIPTION_HANDLER)
            bound.info("message handled", handler=SUBSCRIPTION_HANDLER)
            return
        if conversation is not None:
            handled_by = await self._before_dispatch(message, conversation, tags or frozenset())
            if handled_by is not None:
                await messages.mark_handled(record.id, handled_by)
                bound.info("message handled", handler=handled_by, replies=0)
                return
        context = await self._context(message, record, tags, conversation)
        dispatch = await self._dispatcher.dispatch(message, context)
        replies = list(dispatch.replies)
        handler_name = dispatch.handler_name
        intent_trigger: HandoffTrigger | None = None
        routed = await self._route_by_intent(message, record, context, conversation, replies)
        if routed is not None:
            (replies, intent_trigger), handler_name = routed, INTENT_HANDLER
        trigger: HandoffTrigger | None = None
        if conversation is not None:
            trigger, replies = await self._after_dispatch(message, record, conversation, context, replies)
        trigger = trigger or intent_trigger
        if message.channel is Channel.KF and len(replies) > KF_MAX_REPLIES_PER_MESSAGE:
            bound.warning(
                "kf replies truncated to the per-message quota",
                handler=handler_name,
                wanted=len(replies),
                kept=KF_MAX_REPLIES_PER_MESSAGE,
            )
            replies = replies[:KF_MAX_REPLIES_PER_MESSAGE]
        suppressed = await self._kf_state_forbids_sends(message, record, replies, conversation)
        if suppressed is not None:
            bound.info("kf session not served by the bot; replies not sent", kf_service_state=suppressed)
        outcomes: list[bool | None] = []
        for seq, reply in enumerate(replies):
            if suppressed is not None and reply.channel is Channel.KF and not reply.welcome_code:
                outcomes.append(None)
                continue
            outcomes.append(await self._send_once(record.id, message, seq, reply))
        await self._record_answers(record, message, context, replies, outcomes)
        if trigger is not None and conversation is not None and self._handoff is not None:
            # After the replies: they go out while the session is still the bot's (0/1), before it moves on.
            await self._handoff.handoff(conversation.id, trigger)
        await messages.mark_handled(record.id, handler_name)
        bound.info("message handled", handler=handler_name, replies=len(replies))

    async def _route_by_intent(
        self,
        message: InboundMessage,
        record: InboundRecord,
        context: HandlerContext,
        conversation: HandoffConversation | None,
        replies: list[OutboundMessage],
    ) -> tuple[list[OutboundMessage], HandoffTrigger | None] | None:
        """Keywords left a customer's text to the no-match fallback: the LLM may pick a script or a handoff instead.

        None keeps the fallback (LLM off, "none", low confidence, a failure or the time budget spent). The model
        only chooses a label: a script's approved text, rendered as a keyword match, or the handoff operation.
        """
        intent, handoff = self._intent, self._handoff
        library = context.matcher.library if context.matcher is not None else None
        if intent is None or library is None or not wants_routing(message, replies, library):
            return None
        if handoff is not None and text_trigger(message, handoff.triggers) is not None:
            return None  # the text itself asks for a person
        candidates = intent_candidates(library, context.tags, context.now(), context.last_sent)
        decision = await intent.classify(message.text or "", candidates, ref=f"message:{record.id}")
        if decision.label == HANDOFF_LABEL:
            if handoff is None or conversation is None or conversation.status is not ConversationStatus.BOT:
                return None
            detail = f"confidence {decision.confidence:.2f}"
            return [], HandoffTrigger(HandoffReason.LLM_INTENT, handoff.triggers.default_priority, None, detail)
        script_id = decision.script_id
        routed = routed_replies(message, context, script_id) if script_id is not None else None
        return (routed, None) if routed else None

    async def _handoff_conversation(self, message: InboundMessage, record: InboundRecord) -> HandoffConversation | None:
        """The kf conversation as handoff sees it, when handoff is on (None otherwise)."""
        if self._handoff is None or message.channel is not Channel.KF or record.conversation_id is None:
            return None
        return await self._handoff.conversation(record.conversation_id)

    async def _before_dispatch(
        self, message: InboundMessage, conversation: HandoffConversation, tags: frozenset[str]
    ) -> str | None:
        """Servicer lines, kf events, the quiet bot and tag policies; the handler name when nothing is dispatched."""
        handoff = self._handoff
        assert handoff is not None
        at = float(message.created_at) if message.created_at > 0 else self._clock.now()
        if message.origin == KfOrigin.SERVICER and message.msgtype != "event":
            await handoff.servicer_wrote(conversation, message.servicer_id, at)
            return SERVICER_HANDLER
        if message.msgtype == "event":
            await handoff.kf_event(message, conversation)
            await self._survey_on_session_end(message, conversation)
            return None  # the dispatcher still sees events (the enter_session welcome)
        if not is_customer_text(message):
            return None
        if conversation.status.value in WITH_HUMANS:
            await handoff.customer_wrote(conversation, at)
            return QUIET_HANDLER
        if conversation.status is ConversationStatus.BOT:
            trigger = tag_policy_trigger(tags, handoff.triggers)
            if trigger is not None:
                outcome = await handoff.handoff(conversation.id, trigger, defer_out_of_hours=True)
                # Out of hours a listed customer still gets the bot rather than a closed desk.
                if getattr(outcome, "status", None) != "deferred":
                    return HANDOFF_HANDLER
        return None

    async def _subscription(
        self, message: InboundMessage, record: InboundRecord, conversation: HandoffConversation | None
    ) -> bool:
        """退订 / 订阅 from the customer: stored, then confirmed; True when nothing else is to be done.

        Before script matching, so neither word reaches the library. While people have the conversation the
        state is still stored, but the bot stays quiet (False: the quiet path goes on as for any customer line).
        The confirmation goes through the outbox keyed on this message, so a retried entry sends it once.
        """
        subscriptions, customer_id = self._subscriptions, record.customer_id
        if subscriptions is None or customer_id is None or not is_customer_text(message):
            return False
        change = subscription_command(message.text, self._subscription_config)
        if change is None:
            return False
        at = float(message.created_at) if message.created_at > 0 else self._clock.now()
        changed = await subscriptions.set_opted_out(customer_id, change.opted_out, at=at, source=message.channel.value)
        log.info(
            "subscription command",
            message_id=record.id,
            customer_id=customer_id,
            action=change.action.value,
            changed=changed,
        )
        if conversation is not None and conversation.status.value in WITH_HUMANS:
            return False
        reply = OutboundMessage(
            channel=message.channel,
            to=message.sender_id,
            account_id=message.account_id,
            msgtype="text",
            content={"content": change.reply},
        )
        suppressed = await self._kf_state_forbids_sends(message, record, [reply], conversation)
        if suppressed is not None:
            log.info("subscription reply not sent: kf session not served by the bot", kf_service_state=suppressed)
            return True
        await self._send_once(record.id, message, 0, reply)
        return True

    @staticmethod
    def _is_survey_answer(message: InboundMessage, record: InboundRecord) -> bool:
        return (
            message.channel is Channel.KF
            and is_customer_text(message)
            and record.customer_id is not None
            and is_survey_answer(message.menu_id)
        )

    async def _survey_answer(self, csat: CsatPort, message: InboundMessage, record: InboundRecord) -> None:
        """A survey click: the score is stored once (first answer wins); no scripts, no handoff triggers.

        The thanks goes out for the click that stored the score, through the outbox keyed on this message (a
        retried entry resends nothing twice), and only while the session is the API's (0/1).
        """
        assert record.customer_id is not None
        answer = await csat.record_answer(message, record.customer_id)
        thanks = answer.thanks
        if thanks is None:
            return
        if not answer.recorded and not await self._repos.outbox.replies_for(record.id):
            return  # a later click on an answered survey: ignored (not an error)
        reply = OutboundMessage(
            channel=Channel.KF,
            to=message.sender_id,
            account_id=message.account_id,
            msgtype="text",
            content={"content": thanks},
        )
        suppressed = await self._kf_state_forbids_sends(message, record, [reply])
        if suppressed is not None:
            log.info("csat thanks not sent: kf session not served by the bot", kf_service_state=suppressed)
            return
        await self._send_once(record.id, message, 0, reply)

    async def _survey_on_session_end(self, message: InboundMessage, conversation: HandoffConversation) -> None:
        """A servicer ended the kf session in the WeCom client: ask the survey with the event's msg_code now.

        Asked only when the event resolved the conversation (HandoffPort.kf_event); the code lives 20 s from the
        event's send_time, which is passed along so an event pulled late is not even tried.
        """
        csat, handoff = self._csat, self._handoff
        if csat is None or handoff is None or message.event != KF_SESSION_STATUS_CHANGE:
            return
        raw_event = message.raw.get("event") if isinstance(message.raw, Mapping) else None
        event: Mapping[str, Any] = raw_event if isinstance(raw_event, Mapping) else {}
        if str(event.get("change_type")) != KF_SESSION_ENDED_BY_SERVICER:
            return
        fresh = await handoff.conversation(conversation.id)
        if fresh is None or fresh.status is not ConversationStatus.RESOLVED:
            return
        code = str(event.get("msg_code") or "") or None
        issued_at = float(message.created_at) if message.created_at > 0 else None
        await csat.ask(conversation.id, code, code_issued_at=issued_at)

    async def _after_dispatch(
        self,
        message: InboundMessage,
        record: InboundRecord,
        conversation: HandoffConversation,
        context: HandlerContext,
        replies: list[OutboundMessage],
    ) -> tuple[HandoffTrigger | None, list[OutboundMessage]]:
        """A handoff asked for by the text, menu, answering script or a no-match streak; the replies to send."""
        handoff = self._handoff
        if handoff is None or conversation.status is not ConversationStatus.BOT or not is_customer_text(message):
            return None, replies
        library = context.matcher.library if context.matcher is not None else None
        answered = [r.script_id for r in replies if r.script_id]
        handoff_scripts = handoff_script_ids(library) if library is not None else frozenset()
        trigger = text_trigger(message, handoff.triggers, answered, handoff_scripts)
        if trigger is not None:
            return trigger, replies
        no_match = no_match_script_ids(library) if library is not None else frozenset()
        # The run so far comes from stored answers, not the counter: a retried message must not count twice.
        before = await handoff.no_match_run(conversation, record.id, no_match) if no_match else 0
        streak = next_no_match_streak(before, answered, no_match)
        trigger = no_match_trigger(streak, handoff.triggers)
        if trigger is not None:
            # No second "I did not understand": the handoff's own notice (assigned, queued or out of hours) is
            # what the customer gets for this message.
            return trigger, []
        if streak != conversation.no_match_streak:
            await handoff.set_no_match_streak(conversation.id, streak)
        return None, replies

    async def _sync_corp_tags(self, message: InboundMessage, record: InboundRecord) -> None:
        """Bring the customer's WeCom corp tags up to date before dispatch; a failure only logs.

        - 客户联系 add/edit/add_half: always re-read (the member may just have tagged the customer).
        - change_external_tag: tag definitions changed, so the cached name → id list is dropped.
        - kf customer messages and events: only a customer never synced (cheap check in the syncer).
        """
        syncer = self._tag_syncer
        if syncer is None:
            return
        if message.channel is Channel.CONTACT and message.event == TAG_DEFINITIONS_EVENT:
            syncer.invalidate_tag_list()
            return
        if not message.sender_id:
            return
        try:
            if message.channel is Channel.CONTACT and message.event in CONTACT_TAG_SYNC_CHANGES:
                await asyncio.wait_for(syncer.sync_customer(message.sender_id), self._tag_sync_timeout_s)
            elif (
                message.channel is Channel.KF
                and record.customer_id is not None
                and (
                    message.origin == KfOrigin.CUSTOMER
                    or (message.origin == KfOrigin.SYSTEM_EVENT and message.event == KF_ENTER_SESSION)
                )
            ):
                await asyncio.wait_for(
                    syncer.sync_if_never_synced(record.customer_id, message.sender_id), self._tag_sync_timeout_s
                )
        except Exception as exc:  # the tags are a nicety; the answer must still go out
            log.warning(
                "corp tag sync failed; answering with the tags stored",
                channel=message.channel.value,
                message_id=record.id,
                error=type(exc).__name__,
                errcode=getattr(exc, "errcode", None),
            )

    async def _customer_tags(self, message: InboundMessage, record: InboundRecord) -> frozenset[str] | None:
        """The customer's tags for dispatch, computed tags first brought up to date when this message changes them.

        None when nothing needs them. Idempotent under retries: a second run of the same entry finds the tags
        already recomputed (active), or recomputes to the same set, so a change is recorded once.
        """
        customer_id = record.customer_id
        if customer_id is None or message.channel is Channel.APP:
            return None  # app senders are staff members: never tagged
        reason = _recompute_reason(message) if self._tag_config is not None else None
        if reason is None:
            return await self._repos.tags.customer_tags(customer_id) if self._scripts is not None else None
        by_source = dict(await self._repos.tags.tags_by_source(customer_id))
        computed = by_source.get(TagSource.COMPUTED, frozenset())
        due = {
            RECOMPUTE_ON_INBOUND: recompute_due_on_inbound(computed),
            RECOMPUTE_ON_ENTER_SESSION: not computed,  # an event is not activity: only the first computation
            RECOMPUTE_ON_CONTACT_ADDED: True,
        }[reason]
        if due:
            now = datetime.fromtimestamp(self._clock.now(), UTC)
            try:
                changes = await self._repos.tags.recompute_customer(customer_id, now, self._tag_config, reason=reason)
            except Exception as exc:  # the tags are a nicety; the answer must still go out
                log.warning(
                    "computed tag recompute failed; answering with the tags stored",
                    message_id=record.id,
                    customer_id=customer_id,
                    error=type(exc).__name__,
                )
            else:
                for change in changes:
                    if change.customer_id == customer_id:
                        by_source[TagSource.COMPUTED] = change.after
        return frozenset().union(*by_source.values())

    async def _context(
        self,
        message: InboundMessage,
        record: InboundRecord,
        tags: frozenset[str] | None,
        conversation: HandoffConversation | None = None,
    ) -> HandlerContext:
        """What the handlers get: the current matcher, and the customer's tags, name and script history."""
        context = HandlerContext(clock=self._clock)
        if self._scripts is None:
            return context
        context.matcher = self._scripts.matcher  # taken once: a reload mid-message does not mix libraries
        if tags is not None:
            context.tags = tags
        if record.customer_id is not None:
            last_sent = await self._repos.answers.last_sent_times(record.customer_id)
            context.last_sent = last_sent.get
            if conversation is not None:  # read with its customer just before: the same name
                context.customer_name = conversation.customer_name
            else:
                customer = await self._repos.conversations.get_customer(message.channel, message.sender_id)
                context.customer_name = customer.name if customer is not None else None
        return context

    async def _kf_state_forbids_sends(
        self,
        message: InboundMessage,
        record: InboundRecord,
        replies: list[OutboundMessage],
        read_before: HandoffConversation | None = None,
    ) -> int | None:
        """The stored kf service state when it rules out kf/send_msg (2 pool, 3 human, 4 ended), else None.

        Unknown (never stored) counts as sendable: WeCom answers 95018 then, which fails the reply cleanly.
        `read_before`: the conversation as read before dispatch, good enough for a customer's text (only kf
        events move the state while a message is handled); an event's state is read again.
        """
        needs_send_msg = any(r.channel is Channel.KF and not r.welcome_code for r in replies)
        if not needs_send_msg or record.conversation_id is None:
            return None
        state: int | None
        if read_before is not None and message.msgtype != "event":
            state = read_before.kf_service_state
        else:
            conversation = await self._repos.conversations.get_conversation(record.conversation_id)
            state = conversation.kf_service_state if conversation is not None else None
        return state if state in KF_STATES_WITHOUT_BOT_SENDS else None

    async def _record_answers(
        self,
        record: InboundRecord,
        message: InboundMessage,
        context: HandlerContext,
        replies: list[OutboundMessage],
        outcomes: list[bool | None],
    ) -> None:
        """One answers row per script that answered: script, variant, customer, tags then, and the outcome."""
        by_script: dict[str, list[tuple[OutboundMessage, bool | None]]] = {}
        for reply, outcome in zip(replies, outcomes, strict=True):
            if reply.script_id is not None:
                by_script.setdefault(reply.script_id, []).append((reply, outcome))
        for script_id, sent in by_script.items():
            first = sent[0][0]
            if any(outcome for _, outcome in sent):
                status = AnswerStatus.SENT
            elif all(outcome is None for _, outcome in sent):
                status = AnswerStatus.SUPPRESSED
            else:
                status = AnswerStatus.FAILED
            await self._repos.answers.record_answer(
                inbound_message_id=record.id,
                customer_id=record.customer_id,
                channel=message.channel,
                script_id=script_id,
                variant=first.variant or "",
                assignment=first.assignment or "",
                tags=context.tags,
                status=status,
                replies=len(sent),
            )

    async def _send_once(self, inbound_id: int, message: InboundMessage, seq: int, reply: OutboundMessage) -> bool:
        """Send one reply at most once; True when WeCom has it (now or earlier), False when it was refused."""
        key = reply_idempotency_key(message.channel.value, message.msgid, seq)
        reserved = await self._repos.outbox.reserve_reply(inbound_id, seq, reply, key)
        if reserved.sent:
            return True
        # An earlier process() run reserved this row, so an earlier attempt may have reached WeCom.
        resend = not reserved.created or reserved.attempts > 0
        try:
            provider_msgid = await self._sender.send(reserved.to_outbound(), reserved.idempotency_key, resend=resend)
        except WeComApiError as exc:
            if exc.errcode == DUPLICATE_MSGID_ERRCODE and (resend or exc.after_uncertain_attempt):
                # WeCom refuses a msgid it already accepted: an attempt we never heard back from got through.
                # On a reply's first, certain try the same errcode is a plain invalid-parameter answer instead.
                log.info("reply already accepted by WeCom", outbox_id=reserved.id)
                await self._repos.outbox.mark_sent(reserved.id, None)
                return True
            await self._repos.outbox.mark_failed(reserved.id, f"errcode={exc.errcode} {exc.errmsg}")
            if exc.retryable:
                raise
            # State, quota window, parameters, permissions: a retry would hit the same wall, so the reply is
            # recorded as failed and the message still counts as handled.
            log.warning("reply refused by WeCom", path=exc.path, errcode=exc.errcode, outbox_id=reserved.id)
            return False
        except Exception as exc:
            await self._repos.outbox.mark_failed(reserved.id, type(exc).__name__)
            raise
        await self._repos.outbox.mark_sent(reserved.id, provider_msgid)
        return True


def _recompute_reason(message: InboundMessage) -> str | None:
    """Whether this message can change the sender's computed tags, and why (None: it cannot)."""
    if message.channel is Channel.KF:
        if message.origin == KfOrigin.CUSTOMER and message.msgtype != "event":
            return RECOMPUTE_ON_INBOUND
        if message.origin == KfOrigin.SYSTEM_EVENT and message.event == KF_ENTER_SESSION:
            return RECOMPUTE_ON_ENTER_SESSION
    if message.channel is Channel.CONTACT and message.event == CONTACT_ADDED:
        return RECOMPUTE_ON_CONTACT_ADDED
    return None


def _wecom_type(raw: Mapping[str, Any]) -> str:
    for key in ("MsgType", "msgtype"):
        if key in raw:
            return str(raw[key])[:32]
    return "?"
