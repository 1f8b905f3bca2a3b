"""The console's HTML, CSS and JavaScript: server-rendered pages, a little vanilla JS, no frameworks, no CDN.

Every value from the database is escaped here (`esc`); the JS builds DOM nodes with textContent only. Scripts and
styles are served from /console/static, so the Content-Security-Policy allows no inline code at all.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from html import escape
from typing import Any

from bot.console.policy import ROLE_LABELS, ConsoleUser

STATUS_LABELS = {
    "bot": "机器人接待",
    "queued": "排队中",
    "open": "处理中",
    "waiting": "等待客户",
    "resolved": "已解决",
}
REASON_LABELS = {  # handlers/handoff.py HandoffReason, and older spellings
    "customer_asked": "客户要求转人工",
    "manual": "客服手动转人工",
    "customer_request": "客户要求转人工",
    "request": "客户要求转人工",
    "menu": "菜单转人工",
    "no_match": "连续未匹配",
    "complaint": "投诉",
    "tag_policy": "标签策略",
    "tag": "标签策略",
    "script": "话术转人工",
    "llm_intent": "智能识别需人工处理",
}
AUTHOR_LABELS = {"customer": "客户", "bot": "机器人", "agent": "客服"}
CHANNEL_LABELS = {"kf": "微信客服", "contact": "客户联系", "app": "企业微信应用"}
MSGTYPE_LABELS = {
    "text": "文字",
    "image": "图片",
    "voice": "语音",
    "video": "视频",
    "file": "文件",
    "location": "位置",
    "link": "链接",
    "miniprogram": "小程序",
    "msgmenu": "菜单",
    "business_card": "名片",
    "channels_shop_product": "视频号商品",
    "channels_shop_order": "视频号订单",
    "event": "事件",
}
CLOCK_LABELS = {"first_response": "首次响应", "next_response": "下次响应", "resolution": "解决"}
PRIORITY_LABELS = {"low": "低", "normal": "普通", "high": "高", "urgent": "紧急"}
PRESENCE_LABELS = {"online": "在线", "away": "离开", "offline": "离线"}
ANSWERS_IN_LABELS = {"wecom": "企业微信", "console": "工作台"}


def esc(value: object) -> str:
    return escape("" if value is None else str(value), quote=True)


def label(table: dict[str, str], value: str | None) -> str:
    if value is None:
        return "—"
    return table.get(value, value)


def format_seconds(seconds: float) -> str:
    total = int(abs(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"
    return text


def sla_text(due_at: float | None, now: float) -> tuple[str, str]:
    """(text, css class) of an SLA countdown, as the JS renders it."""
    if due_at is None:
        return "—", "sla none"
    remaining = due_at - now
    if remaining < 0:
        return f"已超时 {format_seconds(remaining)}", "sla breached"
    return f"剩余 {format_seconds(remaining)}", "sla warn" if remaining <= 10 else "sla ok"


def page(title: str, body: str, *, user: ConsoleUser | None = None, csrf: str = "", now: float = 0.0) -> str:
    nav = ""
    if user is not None:
        links = ['<a href="/console/inbox">收件箱</a>']
        if user.is_lead:
            links.append('<a href="/console/lead">主管视图</a>')
        nav = (
            '<header class="top"><nav aria-label="主导航">' + " ".join(links) + "</nav>"
            f'<span class="who">{esc(user.display_name)}（{esc(ROLE_LABELS[user.role])}'
            f"{'，' + esc(user.team) if user.team else ''}）</span>"
            '<form method="post" action="/console/logout" class="logout">'
            f'<input type="hidden" name="csrf" value="{esc(csrf)}">'
            '<button type="submit">退出登录</button></form></header>'
        )
    return (
        "<!doctype html>\n"
        '<html lang="zh-CN"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)} · 客服工作台</title>"
        '<link rel="icon" href="/console/static/favicon.svg" type="image/svg+xml">'
        '<link rel="stylesheet" href="/console/static/console.css">'
        '<script src="/console/static/console.js" defer></script>'
        f'</head><body data-now="{now:.3f}" data-csrf="{esc(csrf)}">{nav}'
        f'<main id="main">{body}</main></body></html>'
    )


def login_page(*, csrf: str, next_path: str, error: str = "", username: str = "") -> str:
    alert = f'<p class="error" role="alert">{esc(error)}</p>' if error else ""
    body = (
        '<section class="login"><h1>客服工作台登录</h1>'
        f"{alert}"
        '<form method="post" action="/console/login">'
        f'<input type="hidden" name="csrf" value="{esc(csrf)}">'
        f'<input type="hidden" name="next" value="{esc(next_path)}">'
        '<label for="username">用户名</label>'
        f'<input id="username" name="username" autocomplete="username" required maxlength="64" '
        f'value="{esc(username)}" autofocus>'
        '<label for="password">密码</label>'
        '<input id="password" name="password" type="password" autocomplete="current-password" required '
        'maxlength="1024">'
        '<button type="submit">登录</button></form></section>'
    )
    return page("登录", body)


def _tags(tags: Iterable[str]) -> str:
    items = "".join(f'<li class="tag">{esc(t)}</li>' for t in tags)
    return f'<ul class="tags" aria-label="客户标签">{items}</ul>' if items else '<span class="muted">无标签</span>'


def _msgtype(msgtype: object) -> str:
    return f"[{label(MSGTYPE_LABELS, str(msgtype))}]"


def inbox_rows_html(rows: Sequence[dict[str, object]], now: float, *, mine: bool) -> str:
    out = []
    for row in rows:
        sla = row.get("sla")
        due = float(sla["due_at"]) if isinstance(sla, dict) else None  # type: ignore[arg-type]
        text, css = sla_text(due, now)
        since = float(row["waiting_since"])  # type: ignore[arg-type]
        tags = row.get("tags") or []
        out.append(
            f'<tr data-id="{esc(row["id"])}">'
            f'<td><a href="/console/conversations/{esc(row["id"])}">{esc(row["customer"])}</a></td>'
            f"<td>{_tags(tags)}</td>"  # type: ignore[arg-type]
            f"<td>{esc(row['status_label'])}</td>"
            f"<td>{esc(row['reason_label'])}</td>"
            + (f"<td>{esc(row.get('assignee') or '—')}</td>" if mine else "")
            + f'<td><span class="waited" data-since="{since:.3f}">{format_seconds(now - since)}</span></td>'
            f'<td><span class="{css}" data-due="{"" if due is None else f"{due:.3f}"}" role="timer">{text}</span>'
            "</td></tr>"
        )
    return "".join(out)


def inbox_page(
    user: ConsoleUser,
    csrf: str,
    now: float,
    queue: Sequence[dict[str, object]],
    mine: Sequence[dict[str, object]],
    mine_title: str,
    *,
    presence: str | None = None,
) -> str:
    if not user.sees_conversations:
        body = '<h1>收件箱</h1><p class="muted">你的角色无权查看客户会话。</p>'
        return page("收件箱", body, user=user, csrf=csrf, now=now)
    head = "<tr><th>客户</th><th>标签</th><th>状态</th><th>转人工原因</th>"
    body = (
        '<h1>收件箱</h1><p id="live" class="muted" role="status" aria-live="polite">实时更新连接中…</p>'
        + presence_form(csrf, presence)
        + f'<section aria-labelledby="queue-title"><h2 id="queue-title">排队中（<span id="queue-count">{len(queue)}'
        "</span>）</h2>"
        f'<table class="inbox" id="queue"><thead>{head}<th>已等待</th><th>SLA</th></tr></thead>'
        f"<tbody>{inbox_rows_html(queue, now, mine=False)}</tbody></table>"
        '<p class="empty" id="queue-empty"' + (" hidden" if queue else "") + ">队列为空</p></section>"
        f'<section aria-labelledby="mine-title"><h2 id="mine-title">{esc(mine_title)}（<span id="mine-count">'
        f"{len(mine)}</span>）</h2>"
        f'<table class="inbox" id="mine"><thead>{head}<th>处理人</th><th>已等待</th><th>SLA</th></tr></thead>'
        f"<tbody>{inbox_rows_html(mine, now, mine=True)}</tbody></table>"
        '<p class="empty" id="mine-empty"' + (" hidden" if mine else "") + ">暂无会话</p></section>"
    )
    return page("收件箱", body, user=user, csrf=csrf, now=now)


def presence_form(csrf: str, presence: str | None) -> str:
    """The 在线 / 离开 / 离线 toggle (only for staff who take conversations)."""
    if presence is None:
        return ""
    buttons = "".join(
        f'<button type="submit" name="presence" value="{value}" '
        f'aria-pressed="{"true" if value == presence else "false"}">{text}</button>'
        for value, text in PRESENCE_LABELS.items()
    )
    return (
        '<section class="presence" aria-labelledby="presence-title"><h2 id="presence-title">接待状态</h2>'
        '<form method="post" action="/console/api/presence" data-presence="1">'
        f'<input type="hidden" name="csrf" value="{esc(csrf)}">'
        f'<span id="presence-now" data-presence="{esc(presence)}">当前：{esc(label(PRESENCE_LABELS, presence))}</span>'
        f"{buttons}</form>"
        '<p id="presence-result" role="status" aria-live="polite"></p></section>'
    )


def agent_option_text(agent: dict[str, object]) -> str:
    presence = label(PRESENCE_LABELS, str(agent.get("presence")))
    where = label(ANSWERS_IN_LABELS, str(agent.get("answers_in")))
    return f"{agent.get('name')}（{presence}，{agent.get('open_count')}/{agent.get('capacity')}，{where}）"


def transfer_field(agents: Sequence[dict[str, object]] | None) -> str:
    if agents is None:
        return (
            '<label for="transfer-to">转给客服（编号）</label>'
            '<input id="transfer-to" name="to_agent_id" type="number" min="1" required inputmode="numeric">'
        )
    options = "".join(f'<option value="{esc(a["id"])}">{esc(agent_option_text(a))}</option>' for a in agents)
    return (
        '<label for="transfer-to">转给同事</label>'
        '<select id="transfer-to" name="to_agent_id" required data-agents="/console/api/agents">'
        f'<option value="">请选择同事…</option>{options}</select>'
    )


def conversation_page(
    user: ConsoleUser,
    csrf: str,
    now: float,
    detail: dict[str, object],
    *,
    agents: Sequence[dict[str, object]] | None = None,
    reply_key: str = "",
) -> str:
    """`detail`: views.detail_json's shape (row, messages, summary, canned).
    `agents`: the transfer picker's choices (None: no agent directory wired, so a plain id field)."""
    row = detail["row"]
    assert isinstance(row, dict)
    summary = detail["summary"]
    assert isinstance(summary, dict)
    canned = detail.get("canned")
    messages = detail["messages"]
    assert isinstance(messages, list)
    history = (
        "".join(
            f'<li class="msg {esc(m["author"])}"><span class="author">{esc(AUTHOR_LABELS.get(m["author"], "?"))}</span>'
            f' <time datetime="{esc(m["at_iso"])}">{esc(m["at_text"])}</time>'
            f'<p class="text">{esc(m["text"] if m["text"] is not None else _msgtype(m["msgtype"]))}</p></li>'
            for m in messages
        )
        or '<li class="muted">暂无消息</li>'
    )
    cid = esc(row["id"])
    forms = (
        f'<section aria-labelledby="actions-title" class="actions" data-conversation="{cid}">'
        '<h2 id="actions-title">操作</h2>'
        '<p id="action-result" role="status" aria-live="polite"></p>'
        f'<form method="post" action="/console/api/conversations/{cid}/claim" data-action="claim">'
        f'<input type="hidden" name="csrf" value="{esc(csrf)}"><button type="submit">认领</button></form>'
        f'<form method="post" action="/console/api/conversations/{cid}/reply" data-action="reply">'
        f'<input type="hidden" name="csrf" value="{esc(csrf)}">'
        '<label for="reply-text">回复客户</label>'
        '<textarea id="reply-text" name="text" required maxlength="2048" rows="3"></textarea>'
        f'<input type="hidden" name="idempotency_key" value="{esc(reply_key)}">'
        '<button type="submit">发送</button></form>'
        f'<form method="post" action="/console/api/conversations/{cid}/transfer" data-action="transfer">'
        f'<input type="hidden" name="csrf" value="{esc(csrf)}">'
        + transfer_field(agents)
        + '<button type="submit">转接</button></form>'
        f'<form method="post" action="/console/api/conversations/{cid}/resolve" data-action="resolve">'
        f'<input type="hidden" name="csrf" value="{esc(csrf)}"><button type="submit">标记解决</button></form>'
        "</section>"
    )
    body = (
        f"<h1>会话 #{cid}：{esc(row['customer'])}</h1>"
        + summary_html(summary, now)
        + f'<section aria-labelledby="history-title"><h2 id="history-title">消息记录</h2>'
        f'<ol class="history">{history}</ol></section>'
        + (canned_html(canned) if isinstance(canned, dict) else "")
        + forms
    )
    return page(f"会话 #{row['id']}", body, user=user, csrf=csrf, now=now)


def summary_html(summary: dict[str, Any], now: float) -> str:
    """The summary block (bot/console/summary.py): the facts, and the LLM's summary once issue 6 adds one."""
    sla = summary.get("sla")
    due = float(sla["due_at"]) if isinstance(sla, dict) else None
    text, css = sla_text(due, now)
    clock = str(sla["label"]) if isinstance(sla, dict) and sla.get("label") else ""
    customer = esc(summary["customer"])
    if summary["customer"] != summary["customer_external_id"]:
        customer += f' <span class="muted">{esc(summary["customer_external_id"])}</span>'
    since = float(summary["waiting_since"])
    waited = (
        ""
        if summary["status"] == "resolved"
        else f'（已等待 <span class="waited" data-since="{since:.3f}">{format_seconds(now - since)}</span>）'
    )
    last = summary.get("last_customer_message")
    last_html = (
        '<span class="muted">客户尚未发言</span>'
        if last is None
        else f'{esc(last)} <time class="muted">{esc(summary.get("last_customer_at_text") or "")}</time>'
    )
    previous = int(summary.get("previous_conversations") or 0)
    if not summary.get("returning"):
        history = "首次咨询"
    elif summary.get("previous_agent"):
        history = f"回头客（此前 {previous} 次会话），上次由 {esc(summary['previous_agent'])} 接待"
    else:
        history = f"回头客（此前 {previous} 次会话），此前均由机器人接待"
    generated = summary.get("generated")
    return (
        '<section class="summary" aria-labelledby="summary-title"><h2 id="summary-title">会话摘要</h2>'
        + (f'<p class="generated" id="summary-generated">{esc(generated)}</p>' if generated else "")
        + '<dl class="facts">'
        f'<dt>客户</dt><dd id="summary-customer">{customer}</dd>'
        f"<dt>客户标签</dt><dd>{_tags(summary.get('tags') or [])}</dd>"
        f'<dt>渠道</dt><dd id="summary-channel">{esc(summary["channel_label"])}</dd>'
        f'<dt>状态</dt><dd id="status">{esc(summary["status_label"])}</dd>'
        f'<dt>处理人</dt><dd id="summary-assignee">{esc(summary.get("assignee") or "—")}</dd>'
        f"<dt>团队</dt><dd>{esc(summary.get('team') or '—')}</dd>"
        f"<dt>优先级</dt><dd>{esc(summary['priority_label'])}</dd>"
        f'<dt>转人工原因</dt><dd id="summary-reason">{esc(summary["reason_label"])}</dd>'
        f'<dt>开始等待</dt><dd id="summary-since">{esc(summary.get("waiting_since_text") or "")}{waited}</dd>'
        f'<dt>SLA{esc(" · " + clock if clock else "")}</dt><dd><span class="{css}" '
        f'data-due="{"" if due is None else f"{due:.3f}"}" role="timer">{text}</span>'
        + (
            f' <span class="muted">（到期 {esc(summary["sla_due_text"])}）</span>'
            if summary.get("sla_due_text")
            else ""
        )
        + "</dd>"
        f'<dt>客户消息</dt><dd id="summary-messages">{int(summary["customer_messages"])} 条</dd>'
        f'<dt>最近客户消息</dt><dd id="summary-last">{last_html}</dd>'
        f'<dt>来访记录</dt><dd id="summary-previous">{history}</dd>'
        "</dl></section>"
    )


def canned_html(canned: dict[str, Any]) -> str:
    """The canned replies (bot/console/canned.py): filtered by a search box, a click fills the reply box."""
    items = canned.get("scripts") or []
    skipped = canned.get("skipped") or []
    tags = canned.get("tags") or []
    basis = (
        "按客户标签 " + "、".join(esc(t) for t in tags) + " 筛选" if tags else "客户没有标签：显示面向所有客户的话术"
    )
    rows = "".join(
        f'<li data-search="{esc((item["title"] + " " + item["id"] + " " + item["text"]).lower())}">'
        f'<button type="button" class="canned-use" data-script="{esc(item["id"])}" data-text="{esc(item["text"])}">'
        f"{esc(item['title'])}</button>"
        f'<p class="text">{esc(item["text"])}</p></li>'
        for item in items
    )
    left_out = (
        f"<details><summary>无法作为文字回复的话术（{len(skipped)}）</summary><ul>"
        + "".join(f"<li>{esc(s['title'])}：{esc(s['reason'])}</li>" for s in skipped)
        + "</ul></details>"
        if skipped
        else ""
    )
    return (
        '<section class="canned" aria-labelledby="canned-title"><h2 id="canned-title">快捷回复</h2>'
        f'<p class="muted">{basis}。点击话术填入回复框，确认后再按“发送”。</p>'
        '<label for="canned-search">搜索话术</label>'
        '<input id="canned-search" type="search" maxlength="100" autocomplete="off" placeholder="标题或内容关键字">'
        f'<ul class="canned-list" id="canned">{rows}</ul>'
        f'<p class="empty" id="canned-empty"{" hidden" if items else ""}>没有匹配的话术</p>'
        f"{left_out}</section>"
    )


def lead_page(user: ConsoleUser, csrf: str, now: float, depth: dict[str, int], met: int, total: int, day: str) -> str:
    rows = (
        "".join(
            f"<tr><td>{esc(team or '（未分组）')}</td><td>{count}</td></tr>" for team, count in sorted(depth.items())
        )
        or '<tr><td colspan="2" class="muted">没有排队的会话</td></tr>'
    )
    share = f"{met / total:.1%}" if total else "—"
    body = (
        "<h1>主管视图</h1>"
        '<section aria-labelledby="depth-title"><h2 id="depth-title">各团队排队数</h2>'
        f'<table class="inbox" id="depth"><thead><tr><th>团队</th><th>排队中</th></tr></thead><tbody>{rows}</tbody>'
        "</table></section>"
        f'<section aria-labelledby="sla-title"><h2 id="sla-title">今日首次响应 SLA 达成率（{esc(day)}）</h2>'
        f'<p><strong id="attainment">{share}</strong>（达标 <span id="met">{met}</span> / '
        f'已响应 <span id="total">{total}</span>）</p></section>'
    )
    return page("主管视图", body, user=user, csrf=csrf, now=now)


def message_page(
    title: str, message: str, *, user: ConsoleUser | None = None, csrf: str = "", back: str = "/console/inbox"
) -> str:
    body = f'<h1>{esc(title)}</h1><p role="alert">{esc(message)}</p><p><a href="{esc(back)}">返回</a></p>'
    return page(title, body, user=user, csrf=csrf)


FAVICON = (
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
    '<rect width="16" height="16" rx="3" fill="#0b57d0"/><path d="M4 5h8v5H7l-3 2z" fill="#fff"/></svg>'
)

CSS = """
:root { color-scheme: light; --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --accent: #0b57d0;
  --bad: #b3261e; --warn: #8a5300; --ok: #146c2e; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, "PingFang SC", "Microsoft YaHei", sans-serif; color: var(--fg); }
main { max-width: 1100px; margin: 0 auto; padding: 16px; }
header.top { display: flex; gap: 16px; align-items: center; padding: 8px 16px; border-bottom: 1px solid var(--line); }
header.top nav a { margin-right: 12px; }
header.top .who { margin-left: auto; color: var(--muted); }
a { color: var(--accent); }
a:focus, button:focus, input:focus, textarea:focus, select:focus { outline: 3px solid #7aa7ff; outline-offset: 1px; }
table.inbox { width: 100%; border-collapse: collapse; }
table.inbox th, table.inbox td { text-align: left; padding: 6px 8px; border-bottom: 1px solid var(--line); }
ul.tags { list-style: none; margin: 0; padding: 0; display: flex; flex-wrap: wrap; gap: 4px; }
li.tag { background: #eef2f7; border-radius: 4px; padding: 0 6px; font-size: 13px; }
.muted, .empty { color: var(--muted); }
.sla { font-variant-numeric: tabular-nums; font-weight: 600; }
.sla.ok { color: var(--ok); } .sla.warn { color: var(--warn); } .sla.breached { color: var(--bad); }
.waited { font-variant-numeric: tabular-nums; }
.error { color: var(--bad); }
section.login { max-width: 360px; margin: 10vh auto; }
form label { display: block; margin-top: 8px; }
section.presence form { display: flex; gap: 8px; align-items: center; }
section.presence button { margin: 0; background: #fff; color: var(--accent); }
section.presence button[aria-pressed="true"] { background: var(--accent); color: #fff; }
input, textarea, select { font: inherit; width: 100%; padding: 6px; border: 1px solid var(--line); border-radius: 4px; }
button { font: inherit; margin-top: 8px; padding: 6px 14px; border: 1px solid var(--accent); border-radius: 4px;
  background: var(--accent); color: #fff; cursor: pointer; }
form.logout button { margin: 0; background: #fff; color: var(--accent); }
dl.facts { display: grid; grid-template-columns: 8em 1fr; gap: 4px 12px; }
dl.facts dt { color: var(--muted); } dl.facts dd { margin: 0; }
ol.history { list-style: none; padding: 0; }
ol.history li { margin: 8px 0; padding: 8px; border-radius: 6px; background: #f6f8fa; }
ol.history li.customer { background: #fff; border: 1px solid var(--line); }
ol.history li.agent { background: #e8f0fe; }
ol.history .author { font-weight: 600; } ol.history time { color: var(--muted); font-size: 13px; }
ol.history .text { margin: 4px 0 0; white-space: pre-wrap; }
section.actions form { margin: 12px 0; }
section.summary .generated { padding: 8px; border-left: 3px solid var(--accent); background: #f6f8fa; }
ul.canned-list { list-style: none; padding: 0; max-height: 22em; overflow-y: auto; }
ul.canned-list li { margin: 6px 0; padding: 6px 8px; border: 1px solid var(--line); border-radius: 6px; }
ul.canned-list li[hidden] { display: none; }
ul.canned-list button { margin: 0; padding: 2px 10px; }
ul.canned-list .text { margin: 4px 0 0; white-space: pre-wrap; color: var(--muted); font-size: 14px; }
"""

JS = r"""
(function () {
  "use strict";
  var body = document.body;
  var csrf = body.getAttribute("data-csrf") || "";
  var offset = parseFloat(body.getAttribute("data-now") || "0") - Date.now() / 1000;
  function now() { return Date.now() / 1000 + offset; }
  function pad(n) { return (n < 10 ? "0" : "") + n; }
  function fmt(seconds) {
    var total = Math.floor(Math.abs(seconds));
    var h = Math.floor(total / 3600), m = Math.floor((total % 3600) / 60), s = total % 60;
    return h ? h + ":" + pad(m) + ":" + pad(s) : pad(m) + ":" + pad(s);
  }
  function tick() {
    var t = now();
    document.querySelectorAll(".sla[data-due]").forEach(function (el) {
      var due = el.getAttribute("data-due");
      if (!due) { return; }
      var left = parseFloat(due) - t;
      el.textContent = left < 0 ? "已超时 " + fmt(left) : "剩余 " + fmt(left);
      el.className = "sla " + (left < 0 ? "breached" : left <= 10 ? "warn" : "ok");
    });
    document.querySelectorAll(".waited[data-since]").forEach(function (el) {
      el.textContent = fmt(t - parseFloat(el.getAttribute("data-since")));
    });
  }
  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined && text !== null) { node.textContent = String(text); }
    return node;
  }
  function row(item, mine) {
    var tr = el("tr", {"data-id": item.id});
    var who = el("td"); who.appendChild(el("a", {href: "/console/conversations/" + item.id}, item.customer));
    tr.appendChild(who);
    var tags = el("td");
    if (item.tags.length) {
      var ul = el("ul", {"class": "tags", "aria-label": "客户标签"});
      item.tags.forEach(function (t) { ul.appendChild(el("li", {"class": "tag"}, t)); });
      tags.appendChild(ul);
    } else { tags.appendChild(el("span", {"class": "muted"}, "无标签")); }
    tr.appendChild(tags);
    tr.appendChild(el("td", {}, item.status_label));
    tr.appendChild(el("td", {}, item.reason_label));
    if (mine) { tr.appendChild(el("td", {}, item.assignee || "—")); }
    var waited = el("td"); waited.appendChild(el("span", {"class": "waited", "data-since": item.waiting_since}));
    tr.appendChild(waited);
    var sla = el("td");
    sla.appendChild(el("span", {"class": "sla", "role": "timer", "data-due": item.sla ? item.sla.due_at : ""},
      item.sla ? "" : "—"));
    tr.appendChild(sla);
    return tr;
  }
  function fill(id, items, mine) {
    var table = document.getElementById(id);
    if (!table) { return; }
    var tbody = table.querySelector("tbody");
    var rows = items.map(function (item) { return row(item, mine); });
    tbody.replaceChildren.apply(tbody, rows);
    document.getElementById(id + "-count").textContent = String(items.length);
    document.getElementById(id + "-empty").hidden = items.length > 0;
  }
  var pending = null, inflight = false, again = false, synced = 0;
  function refresh() {
    if (inflight) { again = true; return; }
    inflight = true;
    fetch("/console/api/inbox", {credentials: "same-origin", headers: {"Accept": "application/json"}})
      .then(function (r) {
        if (r.status === 401) { location.href = "/console/login"; throw new Error("signed out"); }
        return r.json();
      })
      .then(function (data) {
        offset = data.now - Date.now() / 1000;
        fill("queue", data.queue, false);
        fill("mine", data.mine, true);
        tick();
        synced += 1;
        body.setAttribute("data-synced", String(synced));
      })
      .catch(function () {})
      .then(function () { inflight = false; if (again) { again = false; refresh(); } });
  }
  function schedule() { if (pending) { return; } pending = setTimeout(function () { pending = null; refresh(); }, 50); }
  var live = document.getElementById("live");
  if (live && window.EventSource) {
    var source = new EventSource("/console/events");
    source.addEventListener("ready", function () {
      live.textContent = "实时更新已连接";
      body.setAttribute("data-live", "1");
    });
    source.addEventListener("inbox", schedule);
    source.addEventListener("logout", function () { source.close(); location.href = "/console/login"; });
    source.onerror = function () { live.textContent = "实时更新已断开，正在重连…"; body.removeAttribute("data-live"); };
    source.onopen = function () { schedule(); };
  }
  function post(url, data) {
    return fetch(url, {method: "POST", credentials: "same-origin",
      headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf, "Accept": "application/json"},
      body: JSON.stringify(data)}).then(function (r) { return r.json(); });
  }
  function newKey() {
    var bytes = new Uint8Array(18);
    crypto.getRandomValues(bytes);
    return Array.prototype.map.call(bytes, function (b) { return ("0" + b.toString(16)).slice(-2); }).join("");
  }
  // A reply keeps its idempotency key while its text is unchanged: sending it again (a double click, a retry
  // after a network error) never reaches the customer twice; an edited text is a new reply.
  var replyText = document.getElementById("reply-text");
  var replyKey = document.querySelector('input[name="idempotency_key"]');
  if (replyText && replyKey) {
    replyText.addEventListener("input", function () { replyKey.value = newKey(); });
  }
  // Canned replies: a click fills the reply box (a new reply, so a new key); the agent reviews it and sends.
  var cannedSearch = document.getElementById("canned-search");
  var cannedItems = document.querySelectorAll("#canned li[data-search]");
  if (cannedSearch) {
    cannedSearch.addEventListener("input", function () {
      var q = cannedSearch.value.trim().toLowerCase(), shown = 0;
      cannedItems.forEach(function (li) {
        var hit = !q || li.getAttribute("data-search").indexOf(q) >= 0;
        li.hidden = !hit;
        if (hit) { shown += 1; }
      });
      document.getElementById("canned-empty").hidden = shown > 0;
    });
  }
  document.querySelectorAll("button.canned-use").forEach(function (button) {
    button.addEventListener("click", function () {
      if (!replyText) { return; }
      replyText.value = button.getAttribute("data-text") || "";
      replyText.dispatchEvent(new Event("input", {bubbles: true}));
      replyText.focus();
    });
  });
  var kept = null;
  try { kept = sessionStorage.getItem("action-result"); sessionStorage.removeItem("action-result"); } catch (e) {}
  if (kept && document.getElementById("action-result")) { document.getElementById("action-result").textContent = kept; }
  document.querySelectorAll("section.actions form").forEach(function (form) {
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      var out = document.getElementById("action-result");
      var button = form.querySelector("button");
      var data = {};
      new FormData(form).forEach(function (v, k) { if (k !== "csrf") { data[k] = v; } });
      if (button) { button.disabled = true; }
      post(form.action, data)
        .then(function (result) {
          out.textContent = result.ok ? "已完成" : (result.message || "操作失败");
          out.className = result.ok ? "" : "error";
          if (result.ok) {
            // The page reloads to show the change; the confirmation is kept across it instead of vanishing.
            try { sessionStorage.setItem("action-result", out.textContent); } catch (e) {}
            setTimeout(function () { location.reload(); }, 300);
          }
        })
        .catch(function () { out.textContent = "网络错误，请重试"; out.className = "error"; })
        .then(function () { if (button) { button.disabled = false; } });
    });
  });
  var presenceForm = document.querySelector("form[data-presence]");
  if (presenceForm) {
    presenceForm.querySelectorAll("button[name=presence]").forEach(function (button) {
      button.addEventListener("click", function (event) {
        event.preventDefault();
        var out = document.getElementById("presence-result");
        post(presenceForm.action, {presence: button.value})
          .then(function (result) {
            out.textContent = result.ok ? "接待状态已更新" : (result.message || "操作失败");
            out.className = result.ok ? "" : "error";
            if (!result.ok) { return; }
            presenceForm.querySelectorAll("button[name=presence]").forEach(function (b) {
              b.setAttribute("aria-pressed", b === button ? "true" : "false");
            });
            var current = document.getElementById("presence-now");
            current.setAttribute("data-presence", button.value);
            current.textContent = "当前：" + button.textContent;
            schedule();
          })
          .catch(function () { out.textContent = "网络错误，请重试"; out.className = "error"; });
      });
    });
  }
  var picker = document.querySelector("select[data-agents]");
  if (picker) {  // fresh presence and load for the transfer picker
    fetch("/console/api/agents", {credentials: "same-origin", headers: {"Accept": "application/json"}})
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (data) {
        if (!data) { return; }
        var chosen = picker.value;
        var names = {online: "在线", away: "离开", offline: "离线"};
        var where = {wecom: "企业微信", console: "工作台"};
        var options = [el("option", {value: ""}, "请选择同事…")];
        data.agents.forEach(function (a) {
          if (a.id === data.me) { return; }
          options.push(el("option", {value: String(a.id)}, a.name + "（" + (names[a.presence] || a.presence) + "，" +
            a.open_count + "/" + a.capacity + "，" + (where[a.answers_in] || a.answers_in) + "）"));
        });
        picker.replaceChildren.apply(picker, options);
        picker.value = chosen;
        picker.setAttribute("data-loaded", "1");
      })
      .catch(function () {});
  }
  tick();
  setInterval(tick, 1000);
})();
"""
