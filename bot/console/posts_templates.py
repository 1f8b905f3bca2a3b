"""HTML of the console's scheduled-posts pages (/console/posts): list, 7-day calendar and detail with cancel.

Server-rendered and plain, like the rest of the console (bot/console/templates.py): every value is escaped with
`esc`, no inline script or style (the CSP allows none), forms post with the session's CSRF token.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, tzinfo

from bot.cli_posts import TargetPreview
from bot.console.policy import ConsoleUser
from bot.console.templates import esc, label, page
from bot.storage.posts_repository import DeliveryRecord, PostRecord, TargetRecord
from scheduler.slots import RuleError, zone

POST_STATUS_LABELS = {"active": "进行中", "cancelled": "已取消"}
DELIVERY_STATE_LABELS = {
    "scheduled": "待发送",
    "sending": "发送中",
    "sent": "已发送",
    "failed": "失败",
    "skipped": "已跳过",
    "missed": "已错过",
}
STATE_ORDER = tuple(DELIVERY_STATE_LABELS)
REASON_LABELS = {
    "cancelled": "推送已取消",
    "missed_grace_window": "超过补发时限",
    "outcome_unknown": "发送结果未知（为避免重复未重发）",
    "monthly_cap": "已达本月群发上限",
    "robot_rate_limit": "机器人限流，稍后发送",
    "awaiting_confirmation": "等待群主确认",
    "unconfirmed": "群主未确认",
    "refused_by_wecom": "企业微信拒绝",
    "lease_expired": "发送中断，已重新排队",
}
TARGET_KIND_LABELS = {"robot": "群机器人", "group_chat": "客户群", "segment": "客户分群", "staff": "员工"}
CONTENT_KIND_LABELS = {
    "text": "文字",
    "markdown": "Markdown",
    "image": "图片",
    "link": "链接",
    "file": "文件",
    "news": "图文",
}
STATUS_FILTER_LABELS = {"all": "全部", "active": "进行中", "cancelled": "已取消"}
WEEKDAYS = ("周一", "周二", "周三", "周四", "周五", "周六", "周日")


@dataclass(frozen=True, slots=True)
class ListedPost:
    post: PostRecord
    next_slot: datetime | None
    counts: Mapping[str, int]  # delivery rows by state, all targets


@dataclass(frozen=True, slots=True)
class CalendarDay:
    day: date
    entries: Sequence[tuple[datetime, PostRecord]]  # (slot, post), by slot
    more: int  # entries left out of a crowded day


@dataclass(frozen=True, slots=True)
class TargetStatus:
    target: TargetRecord
    counts: Mapping[str, int]
    recent: Sequence[DeliveryRecord]


def local_text(instant: datetime | None, tz: tzinfo) -> str:
    return "—" if instant is None else instant.astimezone(tz).strftime("%Y-%m-%d %H:%M")


def _post_tz(post: PostRecord) -> tzinfo:
    try:
        return zone(post.rule.timezone)
    except RuleError:
        return zone("UTC")


def rule_text(post: PostRecord) -> str:
    rule = post.rule
    if rule.kind == "at":
        return f"一次性：{local_text(rule.at, _post_tz(post))}（{rule.timezone}）"
    if rule.kind == "cron":
        return f"周期：cron「{rule.cron}」（{rule.timezone}）"
    return f"SOP：{rule.sop_plan} 事件后 {rule.sop_offset_s} 秒"


def target_text(target: TargetRecord) -> str:
    kind = label(TARGET_KIND_LABELS, target.kind.value)
    sender = target.params.get("sender")
    return f"{kind}：{target.ref}" + (f"（群主 {sender}）" if sender else "")


def counts_html(counts: Mapping[str, int]) -> str:
    if not counts:
        return '<span class="muted">暂无投递</span>'
    known = [s for s in STATE_ORDER if counts.get(s)] + sorted(s for s in counts if s not in DELIVERY_STATE_LABELS)
    return "，".join(
        f'<span data-state="{esc(s)}">{esc(label(DELIVERY_STATE_LABELS, s))} {int(counts[s])}</span>' for s in known
    )


def _subnav(current: str) -> str:
    links = (("list", "/console/posts", "列表"), ("calendar", "/console/posts/calendar", "日历（未来 7 天）"))
    items = " ".join(
        f'<a href="{href}"' + (' aria-current="page"' if key == current else "") + f">{text}</a>"
        for key, href, text in links
    )
    return f'<nav class="sub" aria-label="推送计划">{items}</nav>'


def _read_only_note(writable: bool) -> str:
    return "" if writable else '<p class="muted" id="read-only">只读：你的角色可以查看推送计划，不能取消。</p>'


def list_page(
    user: ConsoleUser,
    csrf: str,
    now: float,
    rows: Sequence[ListedPost],
    *,
    status_filter: str,
    writable: bool,
    tz: tzinfo,
) -> str:
    filters = " ".join(
        f'<a href="/console/posts?status={key}"'
        + (' aria-current="true"' if key == status_filter else "")
        + f">{text}</a>"
        for key, text in STATUS_FILTER_LABELS.items()
    )
    body_rows = "".join(
        f'<tr data-id="{esc(r.post.id)}">'
        f'<td><a href="/console/posts/{esc(r.post.id)}">{esc(r.post.title)}</a></td>'
        f"<td>{esc(r.post.owner)}</td>"
        f"<td>{esc(rule_text(r.post))}</td>"
        f"<td>{esc(local_text(r.next_slot, tz))}</td>"
        f'<td data-status="{esc(r.post.status.value)}">{esc(label(POST_STATUS_LABELS, r.post.status.value))}</td>'
        f"<td>{counts_html(r.counts)}</td></tr>"
        for r in rows
    )
    body = (
        "<h1>推送计划</h1>"
        + _subnav("list")
        + _read_only_note(writable)
        + f'<p class="filters">筛选：{filters}</p>'
        + '<table class="inbox" id="posts"><thead><tr><th>标题</th><th>负责人</th><th>规则</th><th>下次发送</th>'
        + f"<th>状态</th><th>投递情况</th></tr></thead><tbody>{body_rows}</tbody></table>"
        + ("" if rows else '<p class="empty">暂无推送</p>')
    )
    return page("推送计划", body, user=user, csrf=csrf, now=now)


def calendar_page(
    user: ConsoleUser, csrf: str, now: float, days: Sequence[CalendarDay], *, writable: bool, tz: tzinfo
) -> str:
    sections = []
    for day in days:
        entries = "".join(
            f'<li><time datetime="{esc(slot.isoformat())}">{esc(slot.astimezone(tz).strftime("%H:%M"))}</time> '
            f'<a href="/console/posts/{esc(post.id)}">{esc(post.title)}</a></li>'
            for slot, post in day.entries
        )
        more = f'<p class="muted">另有 {day.more} 次发送未列出</p>' if day.more else ""
        sections.append(
            f'<section class="day" data-day="{esc(day.day.isoformat())}">'
            f"<h2>{esc(day.day.strftime('%m-%d'))} {WEEKDAYS[day.day.weekday()]}</h2>"
            + (f"<ol>{entries}</ol>" if entries else '<p class="empty">无安排</p>')
            + more
            + "</section>"
        )
    body = (
        "<h1>推送日历</h1>"
        + _subnav("calendar")
        + _read_only_note(writable)
        + '<p class="muted">未来 7 天内进行中推送的发送时间（工作台时区）。</p>'
        + f'<div id="calendar">{"".join(sections)}</div>'
    )
    return page("推送日历", body, user=user, csrf=csrf, now=now)


def _delivery_rows(recent: Sequence[DeliveryRecord], tz: tzinfo) -> str:
    rows = "".join(
        f'<tr data-state="{esc(d.state.value)}"><td>{esc(local_text(d.slot_at, tz))}</td>'
        f"<td>{esc(label(DELIVERY_STATE_LABELS, d.state.value))}</td>"
        f"<td>{esc(label(REASON_LABELS, d.reason) if d.reason else '—')}</td>"
        f"<td>{esc(d.errcode if d.errcode is not None else '—')}</td>"
        f"<td>{esc(d.errmsg or '—')}</td>"
        f"<td>{esc(d.attempts)}</td></tr>"
        for d in reversed(recent)
    )
    return (
        '<table class="inbox"><thead><tr><th>计划时间</th><th>状态</th><th>原因</th><th>错误码</th><th>错误信息</th>'
        f"<th>尝试次数</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def detail_page(
    user: ConsoleUser,
    csrf: str,
    now: float,
    post: PostRecord,
    *,
    slots: Sequence[datetime],
    previews: Sequence[TargetPreview],
    statuses: Sequence[TargetStatus],
    writable: bool,
) -> str:
    tz = _post_tz(post)
    pid = esc(post.id)
    facts = (
        '<dl class="facts">'
        f"<dt>负责人</dt><dd>{esc(post.owner)}</dd>"
        f"<dt>内容类型</dt><dd>{esc(label(CONTENT_KIND_LABELS, post.kind))}</dd>"
        f"<dt>规则</dt><dd>{esc(rule_text(post))}</dd>"
        f'<dt>状态</dt><dd id="post-status">{esc(label(POST_STATUS_LABELS, post.status.value))}</dd>'
        f"<dt>创建时间</dt><dd>{esc(local_text(post.created_at, tz))}</dd>"
        + (f"<dt>取消时间</dt><dd>{esc(local_text(post.cancelled_at, tz))}</dd>" if post.cancelled_at else "")
        + "</dl>"
    )
    slot_items = "".join(f"<li>{esc(local_text(s, tz))}</li>" for s in slots) or '<li class="muted">无</li>'
    preview_items = "".join(
        f"<li><strong>{esc(target_text(p.target))}</strong> "
        + (
            f'<span class="muted">[{esc(p.rendered.msgtype)}]</span><p class="text">{esc(p.text)}</p>'
            if p.rendered is not None
            else f'<p class="error">无法发送：{esc(p.error)}</p>'
        )
        + "</li>"
        for p in previews
    )
    status_sections = "".join(
        f'<section class="target" data-target="{esc(s.target.id)}"><h3>{esc(target_text(s.target))}</h3>'
        f"<p>{counts_html(s.counts)}</p>" + (_delivery_rows(s.recent, tz) if s.recent else "") + "</section>"
        for s in statuses
    )
    cancel = ""
    if writable and post.status.value == "active":
        cancel = (
            '<section aria-labelledby="cancel-title" class="cancel"><h2 id="cancel-title">取消推送</h2>'
            f'<form method="post" action="/console/posts/{pid}/cancel">'
            f'<input type="hidden" name="csrf" value="{esc(csrf)}">'
            '<label><input type="checkbox" name="confirm" value="yes" required> '
            "我确认取消此推送：尚未发送的投递将被跳过，取消后不能恢复</label>"
            '<button type="submit">取消推送</button></form></section>'
        )
    body = (
        f"<h1>推送 #{pid}：{esc(post.title)}</h1>"
        + _subnav("")
        + _read_only_note(writable)
        + facts
        + f'<section aria-labelledby="slots-title"><h2 id="slots-title">接下来的发送时间</h2><ol id="slots">'
        f"{slot_items}</ol></section>"
        + f'<section aria-labelledby="preview-title"><h2 id="preview-title">内容预览</h2>'
        f'<ul id="previews">{preview_items}</ul></section>'
        + f'<section aria-labelledby="deliveries-title"><h2 id="deliveries-title">各目标投递情况</h2>'
        f"{status_sections}</section>" + cancel
    )
    return page(f"推送 #{post.id}", body, user=user, csrf=csrf, now=now)
