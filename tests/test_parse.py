"""Callback XML (reference §3) and kf sync_msg items (reference §4.2) → CallbackEvent / InboundMessage."""

from __future__ import annotations

from typing import Any

import pytest

from bot.wecom.parse import (
    CallbackEvent,
    CallbackParseError,
    conversation_key,
    dedupe_key,
    kf_message_to_inbound,
    parse_envelope,
    parse_plaintext,
    to_inbound,
)
from handlers.domain import Channel, KfOrigin

CORP = "wwtestcorp0000001"


def app_xml(
    msgtype: str, body: str, *, msg_id: str | None = "4561255354251345929", sender: str = "zhangsan"
) -> str:
    msg_id_xml = f"<MsgId>{msg_id}</MsgId>" if msg_id else ""
    return (
        f"<xml><ToUserName><![CDATA[{CORP}]]></ToUserName><FromUserName><![CDATA[{sender}]]></FromUserName>"
        f"<CreateTime>1409659813</CreateTime><MsgType><![CDATA[{msgtype}]]></MsgType>{body}{msg_id_xml}"
        "<AgentID>1000002</AgentID></xml>"
    )


def event_xml(event: str, body: str = "", *, sender: str = "zhangsan", agent: bool = True) -> str:
    agent_xml = "<AgentID>1000002</AgentID>" if agent else ""
    return (
        f"<xml><ToUserName><![CDATA[{CORP}]]></ToUserName><FromUserName><![CDATA[{sender}]]></FromUserName>"
        f"<CreateTime>1403610513</CreateTime><MsgType><![CDATA[event]]></MsgType>"
        f"<Event><![CDATA[{event}]]></Event>{body}{agent_xml}</xml>"
    )


def contact_xml(change_type: str, extra: str = "") -> str:
    return event_xml(
        "change_external_contact",
        f"<ChangeType><![CDATA[{change_type}]]></ChangeType><UserID><![CDATA[zhangsan]]></UserID>"
        f"<ExternalUserID><![CDATA[woAJ2GCAAAXtWyujaWJHDDGi0mAAAA]]></ExternalUserID>{extra}",
        sender="sys",
        agent=False,
    )


# --- envelope -----


def test_envelope_extracts_encrypt() -> None:
    body = (
        b"<xml><ToUserName><![CDATA[wx5823bf96d3bd56c7]]></ToUserName>"
        b"<Encrypt><![CDATA[abc+/==]]></Encrypt><AgentID><![CDATA[218]]></AgentID></xml>"
    )
    assert parse_envelope(body) == "abc+/=="


def test_envelope_without_agent_id() -> None:
    assert parse_envelope(b"<xml><ToUserName>x</ToUserName>\n<Encrypt>QUJD</Encrypt>\n</xml>") == "QUJD"


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not xml",
        b"<xml><Encrypt>abc</Encrypt>",
        b"<xml><ToUserName>x</ToUserName></xml>",
        b"<xml><Encrypt></Encrypt></xml>",
        b"<xml><Encrypt><a>b</a></Encrypt></xml>",
        b"\xff\xfe<xml/>",
    ],
)
def test_envelope_rejects_malformed(body: bytes) -> None:
    with pytest.raises(CallbackParseError):
        parse_envelope(body)


BILLION_LAUGHS = (
    '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
    '<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">'
    '<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>'
    "<xml><Encrypt>&lol3;</Encrypt><MsgType>text</MsgType><CreateTime>1</CreateTime></xml>"
)
EXTERNAL_ENTITY = (
    '<?xml version="1.0"?><!DOCTYPE xml [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
    "<xml><Encrypt>&xxe;</Encrypt><MsgType>text</MsgType><CreateTime>1</CreateTime></xml>"
)
PLAIN_DOCTYPE = (
    "<!DOCTYPE xml><xml><Encrypt>abc</Encrypt><MsgType>text</MsgType><CreateTime>1</CreateTime></xml>"
)
UNDECLARED_ENTITY = "<xml><Encrypt>&lol;</Encrypt><MsgType>text</MsgType><CreateTime>1</CreateTime></xml>"


@pytest.mark.parametrize("doc", [BILLION_LAUGHS, EXTERNAL_ENTITY, PLAIN_DOCTYPE, UNDECLARED_ENTITY])
def test_hostile_xml_rejected_in_envelope_and_plaintext(doc: str) -> None:
    with pytest.raises(CallbackParseError) as err:
        parse_envelope(doc.encode())
    assert "lol" not in err.value.reason
    with pytest.raises(CallbackParseError):
        parse_plaintext(doc)


def test_deep_nesting_is_rejected_not_crashing() -> None:
    doc = "<xml><MsgType>text</MsgType><CreateTime>1</CreateTime>" + "<a>" * 5000 + "</a>" * 5000 + "</xml>"
    with pytest.raises(CallbackParseError):
        parse_plaintext(doc)


def test_plaintext_requires_msgtype_and_integer_create_time() -> None:
    with pytest.raises(CallbackParseError):
        parse_plaintext("<xml><CreateTime>1</CreateTime></xml>")
    with pytest.raises(CallbackParseError):
        parse_plaintext("<xml><MsgType>text</MsgType><CreateTime>soon</CreateTime></xml>")


# --- app messages (reference §3) -----


def test_text_message() -> None:
    ev = parse_plaintext(app_xml("text", "<Content><![CDATA[你好 hello]]></Content>"))
    assert (ev.kind, ev.msgtype, ev.event, ev.from_user, ev.to_user) == (
        "message",
        "text",
        None,
        "zhangsan",
        CORP,
    )
    assert (ev.create_time, ev.msg_id, ev.agent_id) == (1409659813, "4561255354251345929", 1000002)
    assert ev.raw["Content"] == "你好 hello"
    assert ev.message.content == "你好 hello"
    assert dedupe_key(ev) == "app-msg:4561255354251345929"
    assert conversation_key(ev) == "app:1000002:zhangsan"
    msg = to_inbound(ev)
    assert msg.channel is Channel.APP
    assert (msg.msgid, msg.sender_id, msg.account_id, msg.msgtype) == (
        "4561255354251345929",
        "zhangsan",
        "1000002",
        "text",
    )
    assert msg.text == "你好 hello"
    assert msg.created_at == 1409659813
    assert msg.conversation_key == conversation_key(ev)


@pytest.mark.parametrize(
    ("msgtype", "body", "field", "value"),
    [
        ("image", "<PicUrl><![CDATA[http://p]]></PicUrl><MediaId><![CDATA[m1]]></MediaId>", "MediaId", "m1"),
        ("voice", "<MediaId><![CDATA[m2]]></MediaId><Format><![CDATA[amr]]></Format>", "Format", "amr"),
        (
            "video",
            "<MediaId><![CDATA[m3]]></MediaId><ThumbMediaId><![CDATA[t3]]></ThumbMediaId>",
            "ThumbMediaId",
            "t3",
        ),
        (
            "location",
            "<Location_X>23.134521</Location_X><Location_Y>113.358803</Location_Y><Scale>20</Scale>"
            "<Label><![CDATA[广州]]></Label><AppType><![CDATA[wxwork]]></AppType>",
            "Label",
            "广州",
        ),
        (
            "link",
            "<Title><![CDATA[t]]></Title><Description><![CDATA[d]]></Description><Url><![CDATA[http://u]]></Url>"
            "<PicUrl><![CDATA[http://p]]></PicUrl>",
            "Url",
            "http://u",
        ),
    ],
)
def test_media_messages(msgtype: str, body: str, field: str, value: str) -> None:
    ev = parse_plaintext(app_xml(msgtype, body))
    assert ev.kind == "message"
    assert ev.msgtype == msgtype
    assert ev.raw[field] == value
    msg = to_inbound(ev)
    assert msg.msgtype == msgtype
    assert msg.text is None
    assert msg.channel is Channel.APP


def test_unknown_msgtype_is_kept_as_unknown() -> None:
    ev = parse_plaintext(app_xml("hologram", "<Payload>x</Payload>"))
    assert ev.kind == "unknown"
    assert ev.msgtype == "hologram"
    assert dedupe_key(ev) == "app-msg:4561255354251345929"
    msg = to_inbound(ev)
    assert msg.msgtype == "unknown"
    assert msg.raw["Payload"] == "x"


def test_unknown_msgtype_without_msgid_still_has_stable_key() -> None:
    ev = parse_plaintext(app_xml("hologram", "", msg_id=None))
    assert dedupe_key(ev) == dedupe_key(parse_plaintext(app_xml("hologram", "", msg_id=None)))
    assert "zhangsan" in dedupe_key(ev)


# --- app events -----


@pytest.mark.parametrize(
    ("event", "body"),
    [
        ("enter_agent", "<EventKey><![CDATA[]]></EventKey>"),
        ("subscribe", ""),
        ("unsubscribe", ""),
        ("click", "<EventKey><![CDATA[MENU_1]]></EventKey>"),
        ("view", "<EventKey><![CDATA[https://example.com]]></EventKey>"),
    ],
)
def test_app_events(event: str, body: str) -> None:
    ev = parse_plaintext(event_xml(event, body))
    assert ev.kind == "event"
    assert ev.msgtype == "event"
    assert ev.event == event
    assert ev.msg_id is None
    key = dedupe_key(ev)
    assert "zhangsan" in key and "1403610513" in key
    assert conversation_key(ev) == "app:1000002:zhangsan"
    msg = to_inbound(ev)
    assert msg.channel is Channel.APP
    assert msg.msgtype == "event"
    assert msg.event == event
    assert msg.msgid == key
    assert msg.conversation_key == conversation_key(ev)


def test_enter_agent_empty_event_key_parses() -> None:
    ev = parse_plaintext(event_xml("enter_agent", "<EventKey><![CDATA[]]></EventKey>"))
    assert ev.raw["EventKey"] == ""


def test_unknown_event_is_unknown_but_keyed() -> None:
    ev = parse_plaintext(event_xml("teleport", "<Where>mars</Where>"))
    assert ev.kind == "unknown"
    assert ev.event == "teleport"
    msg = to_inbound(ev)
    assert msg.msgtype == "unknown"
    assert msg.event == "teleport"
    assert msg.channel is Channel.APP


def test_same_user_same_second_different_events_do_not_collide() -> None:
    first = parse_plaintext(event_xml("enter_agent"))
    second = parse_plaintext(event_xml("click", "<EventKey>K</EventKey>"))
    assert dedupe_key(first) != dedupe_key(second)


# --- 客户联系 events (reference §3.1, §3.2) -----


def test_add_external_contact_with_welcome_code() -> None:
    ev = parse_plaintext(
        contact_xml(
            "add_external_contact",
            "<State><![CDATA[teststate]]></State><WelcomeCode><![CDATA[WELCOMECODE]]></WelcomeCode>",
        )
    )
    assert ev.kind == "event"
    assert ev.event == "change_external_contact"
    assert ev.change_type == "add_external_contact"
    assert ev.from_user == "sys"
    assert ev.agent_id is None
    assert dedupe_key(ev) == (
        "sys-event:change_external_contact:add_external_contact:zhangsan:woAJ2GCAAAXtWyujaWJHDDGi0mAAAA:1403610513"
    )
    assert conversation_key(ev) == "contact:zhangsan:woAJ2GCAAAXtWyujaWJHDDGi0mAAAA"
    msg = to_inbound(ev)
    assert msg.channel is Channel.CONTACT
    assert msg.event == "add_external_contact"
    assert msg.welcome_code == "WELCOMECODE"
    assert (msg.sender_id, msg.account_id) == ("woAJ2GCAAAXtWyujaWJHDDGi0mAAAA", "zhangsan")
    assert msg.msgid == dedupe_key(ev)
    assert msg.conversation_key == conversation_key(ev)


def test_add_external_contact_without_welcome_code() -> None:
    msg = to_inbound(parse_plaintext(contact_xml("add_external_contact")))
    assert msg.welcome_code is None


@pytest.mark.parametrize(
    ("change_type", "extra"),
    [
        ("edit_external_contact", "<State><![CDATA[s]]></State>"),
        ("add_half_external_contact", "<WelcomeCode><![CDATA[W2]]></WelcomeCode>"),
        ("del_external_contact", "<Source><![CDATA[DELETE_BY_TRANSFER]]></Source>"),
        ("del_follow_user", ""),
        ("transfer_fail", "<FailReason><![CDATA[customer_refused]]></FailReason>"),
    ],
)
def test_other_contact_change_types(change_type: str, extra: str) -> None:
    ev = parse_plaintext(contact_xml(change_type, extra))
    assert ev.change_type == change_type
    assert change_type in dedupe_key(ev)
    msg = to_inbound(ev)
    assert msg.channel is Channel.CONTACT
    assert msg.event == change_type


def test_contact_events_for_the_same_pair_differ_by_change_type() -> None:
    add = parse_plaintext(contact_xml("add_external_contact"))
    edit = parse_plaintext(contact_xml("edit_external_contact"))
    assert dedupe_key(add) != dedupe_key(edit)
    assert conversation_key(add) == conversation_key(edit)


def test_change_external_chat_update() -> None:
    ev = parse_plaintext(
        event_xml(
            "change_external_chat",
            "<ChatId><![CDATA[wrOgQhDgAAMYQiS5ol9G7gK9JVAAAA]]></ChatId><ChangeType><![CDATA[update]]></ChangeType>"
            "<UpdateDetail><![CDATA[add_member]]></UpdateDetail><JoinScene>1</JoinScene><QuitScene>0</QuitScene>"
            "<MemChangeCnt>10</MemChangeCnt>",
            sender="sys",
            agent=False,
        )
    )
    assert ev.kind == "event"
    assert ev.change_type == "update"
    assert (
        dedupe_key(ev) == "sys-event:change_external_chat:update:wrOgQhDgAAMYQiS5ol9G7gK9JVAAAA::1403610513"
    )
    assert conversation_key(ev) == "contact:chat:wrOgQhDgAAMYQiS5ol9G7gK9JVAAAA"
    msg = to_inbound(ev)
    assert msg.channel is Channel.CONTACT
    assert msg.event == "change_external_chat"
    assert msg.raw["UpdateDetail"] == "add_member"
    assert msg.conversation_key == conversation_key(ev)


def test_change_external_tag() -> None:
    ev = parse_plaintext(
        event_xml(
            "change_external_tag",
            "<Id><![CDATA[etAAAA]]></Id><TagType><![CDATA[tag]]></TagType>"
            "<ChangeType><![CDATA[create]]></ChangeType>",
            sender="sys",
            agent=False,
        )
    )
    assert ev.kind == "event"
    assert dedupe_key(ev) == "sys-event:change_external_tag:create:etAAAA::1403610513"
    assert conversation_key(ev) == "contact:tag:etAAAA"
    msg = to_inbound(ev)
    assert msg.channel is Channel.CONTACT
    assert msg.conversation_key == conversation_key(ev)


# --- kf notification (reference §3.3) -----

KF_NOTIFY = (
    "<xml><ToUserName><![CDATA[ww12345678910]]></ToUserName><CreateTime>1348831860</CreateTime>"
    "<MsgType><![CDATA[event]]></MsgType><Event><![CDATA[kf_msg_or_event]]></Event>"
    "<Token><![CDATA[ENCApHxnGDNAVNY4AaSJKj4Tb5mwsEMzxhFmHVGcra996NR]]></Token>"
    "<OpenKfId><![CDATA[wkxxxxxxx]]></OpenKfId></xml>"
)


def test_kf_msg_or_event() -> None:
    ev = parse_plaintext(KF_NOTIFY)
    assert ev.kind == "event"
    assert ev.is_kf_notification
    assert ev.from_user == ""
    assert ev.get_text("Token") == "ENCApHxnGDNAVNY4AaSJKj4Tb5mwsEMzxhFmHVGcra996NR"
    assert dedupe_key(ev) == "kf-notify:wkxxxxxxx:ENCApHxnGDNAVNY4AaSJKj4Tb5mwsEMzxhFmHVGcra996NR"
    assert conversation_key(ev) == "kf-pull:wkxxxxxxx"
    msg = to_inbound(ev)
    assert msg.channel is Channel.KF
    assert msg.account_id == "wkxxxxxxx"


def test_callback_event_is_typed_and_frozen() -> None:
    ev = parse_plaintext(KF_NOTIFY)
    assert isinstance(ev, CallbackEvent)
    with pytest.raises(AttributeError):
        ev.msgtype = "text"  # type: ignore[misc]


# --- kf sync_msg items (reference §4.2) -----


def kf_item(msgtype: str, body: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    item: dict[str, Any] = {
        "msgid": "from_msgid_4622416642169452483",
        "open_kfid": "wkAJ2GCAAASSm4_FhToWMFea0xAFfd3Q",
        "external_userid": "wmAJ2GCAAAme1XQRC-NI-q0_ZM9ukoAw",
        "send_time": 1615478585,
        "origin": 3,
        "msgtype": msgtype,
    }
    if body is not None:
        item[msgtype] = body
    item.update(extra)
    return item


def test_kf_customer_text() -> None:
    msg = kf_message_to_inbound(kf_item("text", {"content": "你好"}))
    assert msg.channel is Channel.KF
    assert msg.msgid == "from_msgid_4622416642169452483"
    assert msg.sender_id == "wmAJ2GCAAAme1XQRC-NI-q0_ZM9ukoAw"
    assert msg.account_id == "wkAJ2GCAAASSm4_FhToWMFea0xAFfd3Q"
    assert msg.origin == KfOrigin.CUSTOMER
    assert (msg.msgtype, msg.text, msg.menu_id, msg.created_at) == ("text", "你好", None, 1615478585)
    assert msg.conversation_key == "kf:wkAJ2GCAAASSm4_FhToWMFea0xAFfd3Q:wmAJ2GCAAAme1XQRC-NI-q0_ZM9ukoAw"


def test_kf_text_menu_click() -> None:
    msg = kf_message_to_inbound(kf_item("text", {"content": "满意", "menu_id": "101"}))
    assert msg.menu_id == "101"
    assert msg.text == "满意"


def test_kf_servicer_message_origin_5() -> None:
    msg = kf_message_to_inbound(kf_item("text", {"content": "hi"}, origin=5, servicer_userid="Zhangsan"))
    assert msg.origin == KfOrigin.SERVICER
    assert msg.servicer_id == "Zhangsan"


@pytest.mark.parametrize(
    ("msgtype", "body"),
    [
        ("image", {"media_id": "MEDIA"}),
        ("voice", {"media_id": "MEDIA"}),
        ("video", {"media_id": "MEDIA"}),
        ("file", {"media_id": "MEDIA"}),
        ("location", {"latitude": 23.1, "longitude": 113.3, "name": "n", "address": "a"}),
        ("link", {"title": "t", "desc": "d", "url": "https://u", "pic_url": "https://p"}),
        ("business_card", {"userid": "lisi"}),
        ("miniprogram", {"title": "t", "appid": "wx1", "pagepath": "p", "thumb_media_id": "m"}),
        ("channels_shop_product", {"product_id": "1"}),
        ("merged_msg", {"title": "t", "item": []}),
    ],
)
def test_kf_content_shapes(msgtype: str, body: dict[str, Any]) -> None:
    msg = kf_message_to_inbound(kf_item(msgtype, body))
    assert msg.msgtype == msgtype
    assert msg.text is None
    assert msg.raw[msgtype] == body


def test_kf_unknown_msgtype_kept() -> None:
    msg = kf_message_to_inbound(kf_item("hologram", {"x": 1}))
    assert msg.msgtype == "unknown"
    assert msg.raw["msgtype"] == "hologram"
    assert msg.raw["hologram"] == {"x": 1}


def kf_event(event: dict[str, Any]) -> dict[str, Any]:
    return {"msgid": "evt_1", "send_time": 1615478600, "origin": 4, "msgtype": "event", "event": event}


def test_kf_enter_session_with_welcome_code() -> None:
    msg = kf_message_to_inbound(
        kf_event(
            {
                "event_type": "enter_session",
                "open_kfid": "wkKF",
                "external_userid": "wmCUST",
                "scene": "123",
                "scene_param": "abc",
                "welcome_code": "aaaaaa",
                "wechat_channels": {"nickname": "n", "scene": 1},
            }
        )
    )
    assert msg.channel is Channel.KF
    assert (msg.msgtype, msg.event, msg.origin) == ("event", "enter_session", KfOrigin.SYSTEM_EVENT)
    assert (msg.account_id, msg.sender_id, msg.welcome_code) == ("wkKF", "wmCUST", "aaaaaa")
    assert msg.conversation_key == "kf:wkKF:wmCUST"


def test_kf_enter_session_without_welcome_code() -> None:
    msg = kf_message_to_inbound(
        kf_event({"event_type": "enter_session", "open_kfid": "wkKF", "external_userid": "wmCUST"})
    )
    assert msg.welcome_code is None


@pytest.mark.parametrize(
    ("event", "servicer"),
    [
        (
            {
                "event_type": "msg_send_fail",
                "open_kfid": "wkKF",
                "external_userid": "wmC",
                "fail_msgid": "m",
                "fail_type": 4,
            },
            None,
        ),
        (
            {
                "event_type": "servicer_status_change",
                "open_kfid": "wkKF",
                "servicer_userid": "lisi",
                "status": 1,
                "stop_type": 0,
            },
            "lisi",
        ),
        (
            {
                "event_type": "session_status_change",
                "open_kfid": "wkKF",
                "external_userid": "wmC",
                "change_type": 2,
                "old_servicer_userid": "a",
                "new_servicer_userid": "b",
                "msg_code": "code",
            },
            None,
        ),
        (
            {
                "event_type": "user_recall_msg",
                "open_kfid": "wkKF",
                "external_userid": "wmC",
                "recall_msgid": "r",
            },
            None,
        ),
    ],
)
def test_kf_system_events(event: dict[str, Any], servicer: str | None) -> None:
    msg = kf_message_to_inbound(kf_event(event))
    assert msg.msgtype == "event"
    assert msg.event == event["event_type"]
    assert msg.account_id == "wkKF"
    assert msg.servicer_id == servicer
    assert msg.raw["event"] == event


def test_kf_item_without_msgid_is_rejected() -> None:
    with pytest.raises(CallbackParseError):
        kf_message_to_inbound({"msgtype": "text", "text": {"content": "x"}})


# --- fast parse paths agree with the tree parser -----

from bot.wecom import parse as _parse_mod  # noqa: E402

_SHAPES = [
    "<xml><A>1</A><B><![CDATA[x<y&z]]]></B><A>2</A><A>3</A></xml>",
    "<xml>\n <A>a&amp;b&#20013;</A>\n<!-- c --><B>x<!--c-->y<?pi z?>w</B></xml>",
    '<xml xmlns="urn:x"><A>1</A></xml>',
    '<xml xmlns:p="urn:p"><p:A>1</p:A><A/></xml>',
    "<xml><p:A>1</p:A></xml>",
    "<xml/>",
    "<xml></xml>",
    "<xml>text</xml>",
    "<A>1</A>",
    "<xml><A>\u4e2d\u6587 \U0001f600</A></xml>\n",
    "<xml><A>\r\n x \r</A><B><![CDATA[\r\n]]></B></xml>",
    "<xml><A>a]b</A></xml>",
    "<xml><A b='1'>v</A></xml>",
    "<xml><A>1</A></xml>junk",
    "<xml><A>1</xml>",
    "",
    "<xml><A>&lol;</A></xml>",
    "<xml><A><![CDATA[<!DOCTYPE x>]]></A></xml>",
    "<xml><A>\x01</A></xml>",
    "<xml><A>1</A><B><C>2</C></B></xml>",
    "<xml><A>1</A><A><B>1</B></A></xml>",
]


def _outcome(fn: Any, doc: str) -> tuple[str, Any]:
    try:
        return ("ok", fn(doc))
    except CallbackParseError as exc:
        return ("error", exc.reason)


@pytest.mark.parametrize("doc", _SHAPES)
def test_fast_paths_give_what_the_tree_gives(doc: str) -> None:
    assert _outcome(_parse_mod._xml_to_dict, doc) == _outcome(_parse_mod._tree_to_dict, doc)


def test_plain_shape_takes_the_regex_path_and_others_do_not() -> None:
    assert _parse_mod._plain_dict("<xml><A><![CDATA[x]]></A>\n<B>2</B><A></A></xml>") == {"A": ["x", ""], "B": "2"}
    others = ("<xml><A>&amp;</A></xml>", "<!DOCTYPE xml><xml/>", "<xml><A><B>1</B></A></xml>", "<xml><A>\r</A></xml>")
    for doc in others:
        assert _parse_mod._plain_dict(doc) is None


@pytest.mark.parametrize("doc", [BILLION_LAUGHS, EXTERNAL_ENTITY, PLAIN_DOCTYPE])
def test_expat_pass_refuses_any_dtd(doc: str) -> None:
    with pytest.raises(CallbackParseError) as err:
        _parse_mod._xml_to_dict(doc)
    assert "DTD" in err.value.reason
