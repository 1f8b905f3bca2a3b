"""Safe parsing of WeCom callbacks (reference §1.2, §3) and kf sync_msg items (reference §4.2).

Every XML document goes through defusedxml first with DTDs, entities and external references forbidden, so a
DOCTYPE is rejected before anything in it is expanded. Only an accepted document is turned into a dict and
classified through wechatpy's message/event registries (unknown types fall back to `UnknownMessage`).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pyexpat import ExpatError, ParserCreate
from typing import Any, Literal, NamedTuple, NoReturn

import defusedxml.ElementTree as SafeET
from defusedxml.common import DefusedXmlException
from wechatpy.messages import UnknownMessage
from wechatpy.work.events import EVENT_TYPES
from wechatpy.work.messages import MESSAGE_TYPES

from handlers.domain import Channel, InboundMessage

CallbackKind = Literal["message", "event", "unknown"]

KF_EVENT = "kf_msg_or_event"
CONTACT_EVENT = "change_external_contact"
CHAT_EVENT = "change_external_chat"
TAG_EVENT = "change_external_tag"
CONTACT_EVENTS = frozenset({CONTACT_EVENT, CHAT_EVENT, TAG_EVENT})

# kf sync_msg msgtypes we know the shape of (reference §4.2); anything else is kept as "unknown".
KF_MSGTYPES = frozenset(
    {
        "text",
        "image",
        "voice",
        "video",
        "file",
        "location",
        "link",
        "business_card",
        "miniprogram",
        "msgmenu",
        "channels_shop_product",
        "channels_shop_order",
        "merged_msg",
        "channels",
        "event",
    }
)

_MAX_DEPTH = 32


class CallbackParseError(ValueError):
    """Not a callback we accept; `reason` is short and safe to send back to the caller."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class CallbackEvent(NamedTuple):
    """One decrypted app / 客户联系 / kf-notification callback.

    A NamedTuple rather than a frozen dataclass: as immutable, and built four times faster, once per callback.
    """

    kind: CallbackKind
    msgtype: str
    event: str | None
    change_type: str | None
    from_user: str
    to_user: str
    create_time: int
    msg_id: str | None
    agent_id: int | None
    raw: Mapping[str, Any]
    message_class: type[Any] = UnknownMessage

    @property
    def message(self) -> Any:
        """The wechatpy message object, built on demand (the hot path only needs the class)."""
        return self.message_class(dict(self.raw))

    def get_text(self, name: str) -> str | None:
        """A top-level text field of the plaintext, or None when absent or not text."""
        value = self.raw.get(name)
        return value if isinstance(value, str) else None

    @property
    def is_kf_notification(self) -> bool:
        return self.msgtype == "event" and self.event == KF_EVENT

    @property
    def is_contact_event(self) -> bool:
        return self.msgtype == "event" and self.event in CONTACT_EVENTS


def _safe_fromstring(text: str) -> ET.Element:
    try:
        if "<!DOCTYPE" not in text:
            # Fast path, same result: entities and external references can only be declared in a DTD, and expat
            # recognises a DTD only as "<!DOCTYPE", so without one defusedxml's guards can never fire and the C
            # parser builds the same tree (an undeclared entity is a ParseError either way). Anything with a
            # DOCTYPE, even inside CDATA, takes the defusedxml path below.
            return ET.fromstring(text)  # noqa: S314
        root: ET.Element = SafeET.fromstring(
            text, forbid_dtd=True, forbid_entities=True, forbid_external=True
        )
    except DefusedXmlException:
        raise CallbackParseError("XML with a DTD, entities or external references is not accepted") from None
    except ET.ParseError:
        raise CallbackParseError("malformed XML") from None
    return root


def _add_field(data: dict[str, Any], tag: str, value: Any) -> None:
    """Like xmltodict: a tag seen again turns its value into a list."""
    if tag in data:
        existing = data[tag]
        if isinstance(existing, list):
            existing.append(value)
        else:
            data[tag] = [existing, value]
    else:
        data[tag] = value


def _element_value(element: ET.Element, depth: int) -> Any:
    """Like xmltodict: leaf → text ("" when empty), else a dict; repeated tags become lists."""
    if depth > _MAX_DEPTH:
        raise CallbackParseError("XML nested too deeply")
    if not len(element):
        return element.text or ""
    result: dict[str, Any] = {}
    for child in element:
        # Callbacks are almost all flat: read leaves inline rather than through another call.
        value = _element_value(child, depth + 1) if len(child) else (child.text or "")
        _add_field(result, child.tag, value)
    return result


def _tree_to_dict(text: str) -> dict[str, Any]:
    root = _safe_fromstring(text)
    value = _element_value(root, 0)
    if not isinstance(value, dict):
        return {}
    return value


class _NotFlat(Exception):
    """The document nests deeper than the root's children: the flat pass gives up."""


class _Forbidden(Exception):
    """A DTD (and so any entity declaration) appeared."""


def _forbid(*_args: Any) -> NoReturn:
    raise _Forbidden


def _flat_dict(text: str) -> dict[str, Any]:
    """One pass of the C expat parser straight into {tag: text} for a flat document (raises _NotFlat otherwise).

    Gives exactly what `_tree_to_dict` gives for documents whose root's children are all leaves: expat set up
    as ElementTree sets it up (text re-encoded as UTF-8, "}" namespace separator, comments and processing
    instructions dropped), a leaf's value is all its character data, repeated tags become lists. Any DOCTYPE is
    refused the moment expat reports it, before anything declared in it could be expanded.
    """
    parser = ParserCreate("utf-8", "}")
    parser.buffer_text = True
    parser.StartDoctypeDeclHandler = _forbid
    parser.EntityDeclHandler = _forbid
    parser.UnparsedEntityDeclHandler = _forbid
    parser.ExternalEntityRefHandler = _forbid
    data: dict[str, Any] = {}
    parts: list[str] = []
    depth = 0
    mark = 0

    def start(_tag: str, _attrs: Any) -> None:
        nonlocal depth, mark
        depth += 1
        if depth == 2:
            mark = len(parts)
        elif depth > 2:
            raise _NotFlat

    def end(tag: str) -> None:
        nonlocal depth
        depth -= 1
        if depth == 1:
            if "}" in tag:
                tag = "{" + tag  # ElementTree's spelling of a namespaced name
            value = "".join(parts[mark:])
            _add_field(data, tag, value)

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = parts.append  # text between the root's children is sliced off in end()
    parser.Parse(text, True)
    return data


# The shape WeCom actually sends, matched in C: `<xml>` then leaf children, each holding one CDATA section or
# plain text, separated by XML whitespace, then `</xml>`. Names are plain ASCII (no ':' so no namespaces), no
# attributes, no references ('&' is excluded, so no entity of any kind), no '\r' (expat would normalise it),
# only characters XML allows, and no ']' in plain text (so no ']]>'); a CDATA section ends at its first ']]>'.
# A document that matches is well-formed XML without a DTD, and its {tag: text} is exactly what the tree
# gives. Anything else, however harmless, takes the expat pass below.
_CDATA_CHAR = r"[\t\n\x20-\x5c\x5e-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]"
_TEXT_CHAR = r"[\t\n\x20-\x25\x27-\x3b\x3d-\x5c\x5e-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]"
_LEAF = (
    r"<([A-Za-z_][A-Za-z0-9_]*)>"
    rf"(?:<!\[CDATA\[({_CDATA_CHAR}*(?:\](?!\]>){_CDATA_CHAR}*)*)\]\]>|({_TEXT_CHAR}*))"
    r"</\1>"
)
_PLAIN_LEAF = re.compile(rf"[ \t\r\n]*{_LEAF}")
_PLAIN_END = re.compile(r"[ \t\r\n]*</xml>[ \t\r\n]*")
_ROOT_OPEN = "<xml>"


def _plain_dict(text: str) -> dict[str, Any] | None:
    """{tag: text} for a document of WeCom's plain shape (see _LEAF), None for any other document.

    One pass: each leaf is matched where the previous one ended, so the document is checked and read together
    (the long base64 `Encrypt` text is scanned once, not twice).
    """
    if not text.startswith(_ROOT_OPEN):
        return None
    data: dict[str, Any] = {}
    pos = len(_ROOT_OPEN)
    match_leaf = _PLAIN_LEAF.match
    while (leaf := match_leaf(text, pos)) is not None:
        tag, cdata, plain = leaf.groups("")
        if tag in data:  # rare: a repeated tag becomes a list
            _add_field(data, tag, cdata + plain)
        else:
            data[tag] = cdata + plain  # one of the two is always ""
        pos = leaf.end()
    if _PLAIN_END.fullmatch(text, pos) is None:
        return None
    return data


def _xml_to_dict(text: str) -> dict[str, Any]:
    data = _plain_dict(text)
    if data is not None:
        return data
    try:
        return _flat_dict(text)
    except _Forbidden:
        raise CallbackParseError("XML with a DTD, entities or external references is not accepted") from None
    except ExpatError:
        raise CallbackParseError("malformed XML") from None
    except _NotFlat:
        return _tree_to_dict(text)  # rare: nested elements take the tree path, with its depth limit


def _decode(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise CallbackParseError("body is not UTF-8") from None


def parse_envelope(body: bytes) -> str:
    """The `Encrypt` value of a POSTed callback envelope (reference §1.2)."""
    return parse_envelope_text(_decode(body))


def parse_envelope_text(text: str) -> str:
    """`parse_envelope` for a body already decoded from UTF-8."""
    data = _xml_to_dict(text)
    encrypted = data.get("Encrypt")
    if not isinstance(encrypted, str) or not encrypted.strip():
        raise CallbackParseError("envelope has no Encrypt element")
    return encrypted.strip()


def _text(data: Mapping[str, Any], name: str) -> str | None:
    value = data.get(name)
    if isinstance(value, str):
        stripped = value.strip()
        return stripped or None
    return None


def parse_plaintext(xml: str) -> CallbackEvent:
    """Parse a decrypted callback; unknown MsgType/Event values give kind="unknown", never an error."""
    data = _xml_to_dict(xml)
    msgtype = _text(data, "MsgType")
    if msgtype is None:
        raise CallbackParseError("plaintext has no MsgType")
    create_raw = _text(data, "CreateTime")
    if create_raw is None or not create_raw.isdigit():
        raise CallbackParseError("plaintext has no integer CreateTime")
    msgtype = msgtype.lower()
    event = _text(data, "Event")
    kind: CallbackKind
    if msgtype == "event":
        message_class = EVENT_TYPES.get(event.lower(), UnknownMessage) if event else UnknownMessage
        kind = "event"
    else:
        message_class = MESSAGE_TYPES.get(msgtype, UnknownMessage)
        kind = "message"
    if message_class is UnknownMessage:
        kind = "unknown"
    agent_raw = _text(data, "AgentID")
    agent_id = int(agent_raw) if agent_raw is not None and agent_raw.isdigit() else None
    return CallbackEvent(
        kind=kind,
        msgtype=msgtype,
        event=event,
        change_type=_text(data, "ChangeType"),
        from_user=_text(data, "FromUserName") or "",
        to_user=_text(data, "ToUserName") or "",
        create_time=int(create_raw),
        msg_id=_text(data, "MsgId"),
        agent_id=agent_id,
        raw=data,
        message_class=message_class,
    )


def _contact_subject(event: CallbackEvent) -> str:
    """UserID/ChatId/tag Id of a 客户联系 event, whichever applies."""
    if event.event == CHAT_EVENT:
        return event.get_text("ChatId") or ""
    if event.event == TAG_EVENT:
        return event.get_text("Id") or ""
    return event.get_text("UserID") or ""


def dedupe_key(event: CallbackEvent) -> str:
    """Key under which WeCom's retries of this callback collapse into one queue entry (reference §1.4).

    Namespaced so app MsgIds, event composites and kf notifications never collide with each other or with
    kf sync_msg msgids.
    """
    if event.is_kf_notification:
        return f"kf-notify:{event.get_text('OpenKfId') or ''}:{event.get_text('Token') or ''}"
    if event.msgtype != "event" and event.msg_id:
        return f"app-msg:{event.msg_id}"
    if event.is_contact_event or event.from_user == "sys":
        parts = [
            event.event or "",
            event.change_type or "",
            _contact_subject(event),
            event.get_text("ExternalUserID") or "",
            str(event.create_time),
        ]
        return "sys-event:" + ":".join(parts)
    # FromUserName + CreateTime as the doc says; the event name and msgtype only make the key finer.
    return f"app-event:{event.msgtype}:{event.event or ''}:{event.from_user}:{event.create_time}"


def conversation_key(event: CallbackEvent) -> str:
    """Partition key: callbacks with the same key are handled one at a time, in order."""
    if event.is_kf_notification:
        return f"kf-pull:{event.get_text('OpenKfId') or ''}"
    if event.is_contact_event:
        if event.event == CHAT_EVENT:
            return f"contact:chat:{_contact_subject(event)}"
        if event.event == TAG_EVENT:
            return f"contact:tag:{_contact_subject(event)}"
        return f"contact:{_contact_subject(event)}:{event.get_text('ExternalUserID') or ''}"
    agent = "" if event.agent_id is None else str(event.agent_id)
    return f"app:{agent}:{event.from_user}"


def to_inbound(event: CallbackEvent) -> InboundMessage:
    """Normalise a callback; `InboundMessage.conversation_key` equals `conversation_key(event)`.

    - app messages/events → Channel.APP (sender = member userid, account = agent id)
    - 客户联系 events → Channel.CONTACT; for change_external_contact sender = ExternalUserID, account = UserID
      and `event` = ChangeType (e.g. add_external_contact); customer-group and tag events use account
      "chat"/"tag" with the ChatId/tag Id as sender, and `event` = the Event name
    - kf_msg_or_event (normally queued as kf_pull, not parsed into a message) → Channel.KF
    - unknown MsgType/Event → msgtype "unknown"
    """
    msgtype = "unknown" if event.kind == "unknown" else event.msgtype
    raw = dict(event.raw)
    if event.is_kf_notification:
        return InboundMessage(
            channel=Channel.KF,
            msgid=dedupe_key(event),
            sender_id="",
            account_id=event.get_text("OpenKfId") or "",
            msgtype=msgtype,
            created_at=event.create_time,
            event=event.event,
            raw=raw,
        )
    if event.is_contact_event:
        if event.event == CONTACT_EVENT:
            account, name = _contact_subject(event), event.change_type
            sender = event.get_text("ExternalUserID") or ""
        else:
            account = "chat" if event.event == CHAT_EVENT else "tag"
            sender, name = _contact_subject(event), event.event
        return InboundMessage(
            channel=Channel.CONTACT,
            msgid=dedupe_key(event),
            sender_id=sender,
            account_id=account,
            msgtype=msgtype,
            created_at=event.create_time,
            event=name,
            welcome_code=event.get_text("WelcomeCode"),
            raw=raw,
        )
    is_message = event.msgtype != "event"
    return InboundMessage(
        channel=Channel.APP,
        msgid=event.msg_id if (is_message and event.msg_id) else dedupe_key(event),
        sender_id=event.from_user,
        account_id="" if event.agent_id is None else str(event.agent_id),
        msgtype=msgtype,
        created_at=event.create_time,
        text=event.get_text("Content") if event.msgtype == "text" else None,
        event=None if is_message else event.event,
        raw=raw,
    )


def _str_or_none(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value or None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


def _int(value: Any, default: int = 0) -> int:
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return default


def kf_message_to_inbound(msg: Mapping[str, Any]) -> InboundMessage:
    """Normalise one `kf/sync_msg` msg_list item (reference §4.2).

    For msgtype=event the open_kfid / external_userid / servicer_userid sit inside `event`, and the event
    name is `event.event_type`. Unknown msgtypes are kept with msgtype "unknown"; the item is kept in `raw`.
    """
    if not isinstance(msg, Mapping):
        raise CallbackParseError("kf message is not an object")
    msgid = _str_or_none(msg.get("msgid"))
    if not msgid:
        raise CallbackParseError("kf message has no msgid")
    raw_type = _str_or_none(msg.get("msgtype")) or ""
    origin_value = msg.get("origin")
    origin = _int(origin_value) if origin_value is not None else None
    created_at = _int(msg.get("send_time"))
    raw = dict(msg)
    if raw_type == "event":
        body = msg.get("event")
        ev: Mapping[str, Any] = body if isinstance(body, Mapping) else {}
        return InboundMessage(
            channel=Channel.KF,
            msgid=msgid,
            sender_id=_str_or_none(ev.get("external_userid")) or "",
            account_id=_str_or_none(ev.get("open_kfid")) or _str_or_none(msg.get("open_kfid")) or "",
            msgtype="event",
            created_at=created_at,
            event=_str_or_none(ev.get("event_type")),
            origin=origin,
            servicer_id=_str_or_none(ev.get("servicer_userid")),
            welcome_code=_str_or_none(ev.get("welcome_code")),
            raw=raw,
        )
    text: str | None = None
    menu_id: str | None = None
    if raw_type == "text":
        body = msg.get("text")
        if isinstance(body, Mapping):
            content = body.get("content")
            text = content if isinstance(content, str) else None
            menu_id = _str_or_none(body.get("menu_id"))
    return InboundMessage(
        channel=Channel.KF,
        msgid=msgid,
        sender_id=_str_or_none(msg.get("external_userid")) or "",
        account_id=_str_or_none(msg.get("open_kfid")) or "",
        msgtype=raw_type if raw_type in KF_MSGTYPES else "unknown",
        created_at=created_at,
        text=text,
        origin=origin,
        servicer_id=_str_or_none(msg.get("servicer_userid")),
        menu_id=menu_id,
        raw=raw,
    )
