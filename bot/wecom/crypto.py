"""WeCom callback crypto (WXBizMsgCrypt) on wechatpy: strict input checks, constant-time signatures."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import threading

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
_PADDING = [bytes((n,)) * n for n in range(_BLOCK + 1)]  # PKCS#7 padding of n bytes, for comparison
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
        self._iv = key[:16]  # AES-256-CBC with IV = key[:16] (reference §1.3)
        self._threads = threading.local()  # one reused ECB context per thread, see _cbc_decrypt
        self._receive_id = receive_id
        self._receive_id_bytes = receive_id.encode()

    @property
    def receive_id(self) -> str:
        return self._receive_id

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
            raw = binascii.a2b_base64(encrypted, strict_mode=True)
        except (binascii.Error, ValueError):
            raise CallbackCryptoError(BASE64_DECODE_FAILED, "ciphertext is not valid base64") from None
        size = len(raw)
        if not size or size % 16:
            raise CallbackCryptoError(ILLEGAL_BUFFER, "ciphertext is not a whole number of AES blocks")
        try:
            plain = self._cbc_decrypt(raw)
        except Exception:
            raise CallbackCryptoError(DECRYPT_FAILED, "AES decryption failed") from None
        pad = plain[-1]
        if not 1 <= pad <= _BLOCK or plain[-pad:] != _PADDING[pad]:
            raise CallbackCryptoError(DECRYPT_FAILED, "bad PKCS#7 padding")
        # random(16) ‖ msg_len(4, big-endian) ‖ msg ‖ receiveid ‖ padding, read in place without slicing twice.
        end = size - pad
        if end < 20:
            raise CallbackCryptoError(ILLEGAL_BUFFER, "plaintext too short")
        length = int.from_bytes(plain[16:20], "big")
        if length > end - 20:
            raise CallbackCryptoError(ILLEGAL_BUFFER, "message length exceeds plaintext")
        if not hmac.compare_digest(plain[20 + length : end], self._receive_id_bytes):
            raise CallbackCryptoError(RECEIVEID_MISMATCH, "receiveid does not match the configured corp")
        try:
            return plain[20 : 20 + length].decode("utf-8")
        except UnicodeDecodeError:
            raise CallbackCryptoError(ILLEGAL_BUFFER, "message is not UTF-8") from None

    def _cbc_decrypt(self, raw: bytes) -> bytes:
        """AES-256-CBC decryption of whole blocks (IV = key[:16]) on a reused ECB context.

        Creating a CBC context costs more than decrypting a callback, and one cannot be reset to the IV. ECB
        keeps no state between calls fed whole blocks, so one context serves every call of its thread (a
        context is not shareable between threads: cryptography refuses concurrent use). CBC is then block i's
        ECB output XOR ciphertext block i-1 (the IV for the first), done as one XOR of two integers.
        """
        try:
            ecb = self._threads.ecb
        except AttributeError:
            ecb = self._threads.ecb = Cipher(algorithms.AES(self._key), modes.ECB()).decryptor()  # noqa: S305
        blocks = ecb.update(raw)
        chained = int.from_bytes(blocks, "big") ^ int.from_bytes(self._iv + raw[:-16], "big")
        return chained.to_bytes(len(raw), "big")

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
