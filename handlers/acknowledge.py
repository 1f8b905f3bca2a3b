"""Until the script library exists, customers get a fixed, polite acknowledgement."""

from __future__ import annotations

from handlers.domain import (
    UNHANDLED,
    Channel,
    HandlerContext,
    HandlerResult,
    InboundMessage,
    KfOrigin,
    OutboundMessage,
)

ACKNOWLEDGEMENT = "您好，已收到您的消息，我们会尽快回复您。"


async def acknowledge_customer_text(message: InboundMessage, context: HandlerContext) -> HandlerResult:
    """Answer a customer's (or staff member's) message with the fixed acknowledgement."""
    if message.msgtype == "event" or message.msgtype == "unknown":
        return UNHANDLED
    if message.channel is Channel.KF and message.origin != KfOrigin.CUSTOMER:
        return UNHANDLED
    if message.channel not in (Channel.KF, Channel.APP):
        return UNHANDLED
    return [
        OutboundMessage(
            channel=message.channel,
            to=message.sender_id,
            account_id=message.account_id,
            msgtype="text",
            content={"content": ACKNOWLEDGEMENT},
        )
    ]
