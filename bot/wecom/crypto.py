"""WeCom callback crypto (WXBizMsgCrypt) on wechatpy: strict input checks, constant-time signatures."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import struct

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from wechatpy.work.crypto import PrpCrypto

# Official library error codes (reference §1.3), kept so logs and tests speak WeCom's language.
SIGNATURE_MISMATCH = -40001
ILLEGAL_AES_KEY = -40004
RECEIVEID_MISMATCH = -40005
DECRYPT_FAILED = -40007
ILLEGAL_BUFFER = -40008
BASE64_DECODE_FAILED = -40010

_BLOCK = 32
_MAX_ENCRYPTED_CHARS = 2_000_000


class CallbackCryptoError(Exception):
    """A callback that must be rejected; `code` is the official WXBizMsgCrypt error code."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def compute_signature(token: str, timestamp: str, nonce: str, encrypted: str) -> str:
    """sha1 of the four values sorted lexicographically and joined, as lowercase hex."""
    return hashlib.sha1("".join(sorted([token, timestamp, nonce, encrypted])).encode()).hexdigest()  # noqa: S324


class CallbackCrypto:
    """Verify, decrypt and encrypt callback payloads for one (token, EncodingAESKey, receiveid)."""

    def __init__(self, token: str, encoding_aes_key: str, receive_id: str) -> None:
        try:
            key = base64.b64decode(encoding_aes_key + "=", validate=True)
        except (binascii.Error, ValueError):
            raise CallbackCryptoError(ILLEGAL_AES_KEY, "EncodingAESKey is not base64") from None
        if len(key) != 32:
            raise CallbackCryptoError(ILLEGAL_AES_KEY, "EncodingAESKey must decode to 32 bytes")
        self._token = token
        self._key = key
        # One Cipher per key (AES-256-CBC, IV = key[:16], reference §1.3); each decrypt makes a fresh context.
        self._cipher = Cipher(algorithms.AES(key), modes.CBC(key[:16]))
        self.receive_id = receive_id

    def sign(self, timestamp: str, nonce: str, encrypted: str) -> str:
        return compute_signature(self._token, timestamp, nonce, encrypted)

    def verify_signature(self, signature: str, timestamp: str, nonce: str, encrypted: str) -> None:
        expected = self.sign(timestamp, nonce, encrypted)
        if not hmac.compare_digest(expected.encode(), signature.lower().encode()):
            raise CallbackCryptoError(SIGNATURE_MISMATCH, "signature mismatch")

    def decrypt(self, encrypted: str) -> str:
        """Decrypt `Encrypt`/`echostr`; check padding, length and receiveid before trusting any byte."""
        if len(encrypted) > _MAX_ENCRYPTED_CHARS:
            raise CallbackCryptoError(ILLEGAL_BUFFER, "ciphertext too long")
        try:
            # base64.b64decode(encrypted, validate=True) without its wrapper: ASCII only, strict alphabet.
            raw = binascii.a2b_base64(encrypted.encode("ascii"), strict_mode=True)
        except (binascii.Error, ValueError):
            raise CallbackCryptoError(BASE64_DECODE_FAILED, "ciphertext is not valid base64") from None
        if not raw or len(raw) % 16:
            raise CallbackCryptoError(ILLEGAL_BUFFER, "ciphertext is not a whole number of AES blocks")
        try:
            decryptor = self._cipher.decryptor()
            plain = decryptor.update(raw) + decryptor.finalize()
        except Exception:
            raise CallbackCryptoError(DECRYPT_FAILED, "AES decryption failed") from None
        pad = plain[-1]
        if not 1 <= pad <= _BLOCK or plain[-pad:] != bytes((pad,)) * pad:
            raise CallbackCryptoError(DECRYPT_FAILED, "bad PKCS#7 padding")
        content = plain[16:-pad]
        if len(content) < 4:
            raise CallbackCryptoError(ILLEGAL_BUFFER, "plaintext too short")
        (length,) = struct.unpack(">I", content[:4])
        if length > len(content) - 4:
            raise CallbackCryptoError(ILLEGAL_BUFFER, "message length exceeds plaintext")
        receive_id = content[4 + length :]
        if not hmac.compare_digest(receive_id, self.receive_id.encode()):
            raise CallbackCryptoError(RECEIVEID_MISMATCH, "receiveid does not match the configured corp")
        try:
            return content[4 : 4 + length].decode("utf-8")
        except UnicodeDecodeError:
            raise CallbackCryptoError(ILLEGAL_BUFFER, "message is not UTF-8") from None

    def verify_and_decrypt(self, signature: str, timestamp: str, nonce: str, encrypted: str) -> str:
        self.verify_signature(signature, timestamp, nonce, encrypted)
        return self.decrypt(encrypted)

    def encrypt(self, plaintext: str, random_prefix: bytes | None = None) -> str:
        """Encrypt as WeCom does (what the simulator sends, and passive replies)."""
        prp = PrpCrypto(self._key)
        if random_prefix is not None:
            if len(random_prefix) != 16:
                raise ValueError("random_prefix must be 16 bytes")
            prefix = random_prefix.decode("ascii")
            prp.get_random_string = lambda: prefix  # type: ignore[method-assign]
        else:
            token = secrets.token_hex(8)
            prp.get_random_string = lambda: token  # type: ignore[method-assign]
        encrypted: bytes = prp.encrypt(plaintext, self.receive_id)
        return encrypted.decode("ascii")

    def encrypt_and_sign(
        self, plaintext: str, timestamp: str, nonce: str, random_prefix: bytes | None = None
    ) -> tuple[str, str]:
        encrypted = self.encrypt(plaintext, random_prefix)
        return encrypted, self.sign(timestamp, nonce, encrypted)


def passive_reply_xml(encrypted: str, signature: str, timestamp: str, nonce: str) -> str:
    """The encrypted passive-reply envelope (reference §1.4)."""
    return (
        "<xml>\n"
        f"<Encrypt><![CDATA[{encrypted}]]></Encrypt>\n"
        f"<MsgSignature><![CDATA[{signature}]]></MsgSignature>\n"
        f"<TimeStamp>{timestamp}</TimeStamp>\n"
        f"<Nonce><![CDATA[{nonce}]]></Nonce>\n"
        "</xml>"
    )
