"""Every official callback-crypto vector of reference §2, run through CallbackCrypto."""

from __future__ import annotations

import base64
from urllib.parse import unquote

import pytest

from bot.wecom.crypto import (
    RECEIVEID_MISMATCH,
    SIGNATURE_MISMATCH,
    CallbackCrypto,
    CallbackCryptoError,
    passive_reply_xml,
)

# V1/V2: official doc path/90968 key set.
V1_TOKEN = "QDG6eK"
V1_KEY = "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C"
V1_CORP = "wx5823bf96d3bd56c7"
V1_SIGNATURE = "477715d11cdb4164915debcba66cb864d751f3e6"
V1_TIMESTAMP = "1409659813"
V1_NONCE = "1372623149"
V1_ENCRYPT = (
    "RypEvHKD8QQKFhvQ6QleEB4J58tiPdvo+rtK1I9qca6aM/wvqnLSV5zEPeusUiX5L5X/0lWfrf0QADHHhGd3QczcdCUpj911L3vg3W/sY"
    "YvuJTs3TUUkSUXxaccAS0qhxchrRYt66wiSpGLYL42aM6A8dTT+6k4aSknmPj48kzJs8qLjvd4Xgpue06DOdnLxAUHzM6+kDZ+HMZfJYu"
    "R+LtwGc2hgf5gsijff0ekUNXZiqATP7PF5mZxZ3Izoun1s4zG4LUMnvw2r+KqCKIw+3IQH03v+BCA9nMELNqbSf6tiWSrXJB3LAVGUcal"
    "lcrw8V2t9EL4EhzJWrQUax5wLVMNS0+rUPA3k22Ncx4XXZS9o0MBH27Bo6BpNelZpS+/uh9KsNlY6bHCmJU9p8g7m3fVKn28H3KDYA5Pl"
    "/T8Z1ptDAVe0lXdQ2YoyyH2uyPIGHBZZIs2pDBS8R07+qN+E7Q=="
)
V1_PLAINTEXT = (
    "<xml><ToUserName><![CDATA[wx5823bf96d3bd56c7]]></ToUserName>\n"
    "<FromUserName><![CDATA[mycreate]]></FromUserName>\n"
    "<CreateTime>1409659813</CreateTime>\n"
    "<MsgType><![CDATA[text]]></MsgType>\n"
    "<Content><![CDATA[hello]]></Content>\n"
    "<MsgId>4561255354251345929</MsgId>\n"
    "<AgentID>218</AgentID>\n"
    "</xml>"
)

V2_SIGNATURE = "5c45ff5e21c57e6ad56bac8758b79b1d9ac89fd3"
V2_TIMESTAMP = "1409659589"
V2_NONCE = "263014780"
V2_ECHOSTR = "P9nAzCzyDtyTWESHep1vC5X9xho/qYX3Zpb4yKa9SKld1DsH3Iyt3tP3zNdtp+4RPcs8TgAE7OaBO+FZXvnaqQ=="
V2_ECHOSTR_URLENCODED = (
    "P9nAzCzyDtyTWESHep1vC5X9xho%2FqYX3Zpb4yKa9SKld1DsH3Iyt3tP3zNdtp%2B4RPcs8TgAE7OaBO%2BFZXvnaqQ%3D%3D"
)
V2_ECHO_PLAINTEXT = "1616140317555161061"

# V3/V4: official Python sample, second key set.
V3_TOKEN = "hJqcu3uJ9Tn2gXPmxx2w9kkCkCE2EPYo"
V3_KEY = "6qkdMrq68nTKduznJYO1A37W2oEgpkMUvkttRToqhUt"
V3_CORP = "ww1436e0e65a779aee"
V3_VERIFY_SIGNATURE = "012bc692d0a58dd4b10f8dfe5c4ac00ae211ebeb"
V3_VERIFY_TIMESTAMP = "1476416373"
V3_VERIFY_NONCE = "47744683"
V3_ECHOSTR = "fsi1xnbH4yQh0+PJxcOdhhK6TDXkjMyhEPA7xB2TGz6b+g7xyAbEkRxN/3cNXW9qdqjnoVzEtpbhnFyq6SVHyA=="
V3_ECHO_PLAINTEXT = "1288432023552776189"
V3_SIGNATURE = "0c3914025cb4b4d68103f6bfc8db550f79dcf48e"
V3_TIMESTAMP = "1476422779"
V3_NONCE = "1597212914"
V3_ENCRYPT = (
    "Kl7kjoSf6DMD1zh7rtrHjFaDapSCkaOnwu3bqLc5tAybhhMl9pFeK8NslNPVdMwmBQTNoW4mY7AIjeLvEl3NyeTkAgGzBhzTtRLNshw2A"
    "Eew+kkYcD+Fq72Kt00fT0WnN87hGrW8SqGc+NcT3mu87Ha3dz1pSDi6GaUA6A0sqfde0VJPQbZ9U+3JWcoD4Z5jaU0y9GSh010wsHF8KZ"
    "D24YhmZH4ch4Ka7ilEbjbfvhKkNL65HHL0J6EYJIZUC2pFrdkJ7MhmEbU2qARR4iQHE7wy24qy0cRX3Mfp6iELcDNfSsPGjUQVDGxQDCW"
    "jayJOpcwocugux082f49HKYg84EpHSGXAyh+/oxwaWbvL6aSDPOYuPDGOCI8jmnKiypE+"
)
V3_PLAINTEXT = (
    "<xml><ToUserName>ww1436e0e65a779aee</ToUserName><FromUserName>ChenJiaShun</FromUserName>"
    "<CreateTime>1476422779</CreateTime><MsgType>text</MsgType><Content>你好</Content>"
    "<MsgId>1456453720</MsgId><AgentID>1000002</AgentID></xml>"
)

V4_SIGNATURE = "e3647471e395139e2308c1fa963f2d648a00b90e"
V4_TIMESTAMP = "1409659813"
V4_NONCE = "1372623149"
V4_ENCRYPT = (
    "cjhLUX7UU4yCSelv1vz7T0zT8huF51bAMVWriNvO1FMegHrQZNrtvRxbwf0fUPsFvwqR0U0fgiJNEA5Y30F2MoI2S7vv3EjVQ68C0cjw9"
    "frBoUE2Hj0BvFp9h3u6Vbsg4lc1C8AtHdaN8orKuNKkLRLuYEL52R1J3v8olJGZRLnRdVKIivixmX/eQpzgeExtp20jI1HxRP1AAZ6xZo"
    "ILdqDPO549LO4WeG+685JRUTdiwcY5fjZlqeMxuT4PpMn1X9OWsS7NRj06Wa5E3Tvg4twjWp39KPfOdRte6P1T4JU="
)
V4_PLAINTEXT = (
    '{ "ToUserName": "wx5823bf96d3bd56c7", "FromUserName": :mycreate", "CreateTime": 1409659813, '
    '"MsgType": "text", "Content": "hello", "MsgId": 4561255354251345929, "AgentID": 218}'
)

# V5: wechatpy work crypto tests.
V5_TOKEN = "123456"
V5_KEY = "kWxPEV2UEDyxWpmPdKC3F4dgPDmOvfKX1HGnEUDS1aR"
V5_CORP = "wx49f0ab532d5d035a"
V5_VERIFY_SIGNATURE = "dd6b9c95b495b3f7e2901bfbc76c664930ffdb96"
V5_VERIFY_TIMESTAMP = "1411443780"
V5_VERIFY_NONCE = "437374425"
V5_ECHOSTR = "4ByGGj+sVCYcvGeQYhaKIk1o0pQRNbRjxybjTGblXrBaXlTXeOo1+bXFXDQQb1o6co6Yh9Bv41n7hOchLF6p+Q=="
V5_ECHO_PLAINTEXT = "5927782489442352469"
V5_SIGNATURE = "74d92dfeb87ba7c714f89d98870ae5eb62dff26d"
V5_TIMESTAMP = "1411525903"
V5_NONCE = "461056294"
V5_ENCRYPT = (
    "RgqEoJj5A4EMYlLvWO1F86ioRjZfaex/gePD0gOXTxpsq5Yj4GNglrBb8I2BAJVODGajiFnXBu7mCPatfjsu6IHCrsTyeDXzF6Bv283dG"
    "ymzxh6ydJRvZsryDyZbLTE7rhnus50qGPMfp2wASFlzEgMW9z1ef/RD8XzaFYgm7iTdaXpXaG4+BiYyolBug/gYNx410cvkKR2/nPwBiT"
    "+P4hIiOAQqGp/TywZBtDh1yCF2KOd0gpiMZ5jSw3e29mTvmUHzkVQiMS6td7vXUaWOMZnYZlF3So2SjHnwh4jYFxdgpkHHqIrH/54SNds"
    "hoQgWYEvccTKe7FS709/5t6NMxuGhcUGAPOQipvWTT4dShyqio7mlsl5noTrb++x6En749zCpQVhDpbV6GDnTbcX2e8K9QaNWHp91eBdC"
    "RxthuL0="
)
V5_PLAINTEXT = (
    "<xml><ToUserName><![CDATA[wx49f0ab532d5d035a]]></ToUserName>\n"
    "<FromUserName><![CDATA[messense]]></FromUserName>\n"
    "<CreateTime>1411525903</CreateTime>\n"
    "<MsgType><![CDATA[text]]></MsgType>\n"
    "<Content><![CDATA[test]]></Content>\n"
    "<MsgId>4363689963896700987</MsgId>\n"
    "<AgentID>1</AgentID>\n"
    "</xml>"
)
V5_REPLY_PLAINTEXT = (
    "<xml>\n"
    "<MsgType><![CDATA[text]]></MsgType>\n"
    "<Content><![CDATA[test]]></Content>\n"
    "<FromUserName><![CDATA[wx49f0ab532d5d035a]]></FromUserName>\n"
    "<ToUserName><![CDATA[messense]]></ToUserName>\n"
    "<AgentID>1</AgentID>\n"
    "<CreateTime>1411525903</CreateTime>\n"
    "</xml>"
)
V5_REPLY_ENCRYPT = (
    "9s4gMv99m88kKTh/H8IdkOiMg6bisoy3ypwy9H4hvSPe9nsGaqyw5hhSjdYbcrKk+j3nba4HMOTzHrluLBYqxgNcBqGsL8GqxlhZgURnA"
    "tObvesEl5nZ+uBE8bviY0LWke8Zy9V/QYKxNV2FqllNXcfmstttyIkMKCCmVbCFM2JTF5wY0nFhHZSjPUL2Q1qvSUCUld+/WIXrx0oyKQ"
    "mpB6o8NRrrNrsDf03oxI1p9FxUgMnwKKZeOA/uu+2IEvEBtb7muXsVbwbgX05UPPJvFurDXafG0RQyPR+mf1nDnAtQmmNOuiR5MIkdQ39"
    "xn1vWwi1O5oazPoQJz0nTYjxxEE8kv3kFxtAGVRe3ypD3WeK2XeFYFMNMpatF9XiKzHo3"
)
V5_REPLY_SIGNATURE = "407518b7649e86ef23978113f92d27afa9296533"

# V6: locally generated AI-bot style vector (receiveid ""), a round-trip self-test.
V6_TIMESTAMP = "1700000000"
V6_NONCE = "nonce123"
V6_PLAINTEXT = (
    '{"msgid":"MSGID1","aibotid":"AIBOTID","chattype":"single","from":{"userid":"zhangsan"},'
    '"response_url":"https://qyapi.weixin.qq.com/cgi-bin/aibot/response?response_code=RC",'
    '"msgtype":"text","text":{"content":"hello"}}'
)
V6_ENCRYPT = (
    "y514aRT8yYkYNee3kPvkrHVNS8Cdte7Kt9Uh7qChgPCJuL1LWHt9SnIxVI+qTpyBOCrWA1eReBp2dRefGvX8+zUK/A2zQJRDTjGQTdQRY"
    "lVFfq/29eltyU6KlxqyEPTLO/+ZgVctYw2hLSwRFWH/X0ZzgFTfDIMvR3TQrf18g8I45H1Eq179IdKAuV6uRPgEbK94I9noM8F/Cy4TKy"
    "DpWJoGqS/e0qPfQu1yhRTcQeZzeO/pYJW+VB9HP0w+d8bfs04ZJnvrY9DbNaT97dhQfkXqm9lqI2rJ/s4m8qIhgj1dBGtLriyHyYPzTWE"
    "67PtKtbxWqTYzhsoe5ZFAr5aUGQ=="
)
V6_SIGNATURE = "48c9a761cc3c128b11ded5aef31fba1ecf33540f"
V6_ECHOSTR = "y514aRT8yYkYNee3kPvkrM4Qd/WIaqLgQ+7BpGRIp48="
V6_ECHO_SIGNATURE = "f2850d721e7d3cc44226c2fbe3e227b8d33d402a"
FIXED_PREFIX = b"1234567890123456"


def v1() -> CallbackCrypto:
    return CallbackCrypto(V1_TOKEN, V1_KEY, V1_CORP)


def v3() -> CallbackCrypto:
    return CallbackCrypto(V3_TOKEN, V3_KEY, V3_CORP)


def v5() -> CallbackCrypto:
    return CallbackCrypto(V5_TOKEN, V5_KEY, V5_CORP)


# --- V1: POST message -----


def test_v1_signature() -> None:
    assert v1().sign(V1_TIMESTAMP, V1_NONCE, V1_ENCRYPT) == V1_SIGNATURE


def test_v1_decrypts_to_exact_plaintext() -> None:
    assert v1().verify_and_decrypt(V1_SIGNATURE, V1_TIMESTAMP, V1_NONCE, V1_ENCRYPT) == V1_PLAINTEXT


def test_v1_wrong_corp_is_receiveid_mismatch() -> None:
    crypto = CallbackCrypto(V1_TOKEN, V1_KEY, "wx0000000000000000")
    with pytest.raises(CallbackCryptoError) as err:
        crypto.verify_and_decrypt(V1_SIGNATURE, V1_TIMESTAMP, V1_NONCE, V1_ENCRYPT)
    assert err.value.code == RECEIVEID_MISMATCH


def test_v1_tampered_signature_fails() -> None:
    with pytest.raises(CallbackCryptoError) as err:
        v1().verify_and_decrypt("0" * 40, V1_TIMESTAMP, V1_NONCE, V1_ENCRYPT)
    assert err.value.code == SIGNATURE_MISMATCH


# --- V2: URL verification -----


def test_v2_url_verification() -> None:
    assert v1().verify_and_decrypt(V2_SIGNATURE, V2_TIMESTAMP, V2_NONCE, V2_ECHOSTR) == V2_ECHO_PLAINTEXT


def test_v2_urlencoded_form_decodes_with_unquote() -> None:
    assert unquote(V2_ECHOSTR_URLENCODED) == V2_ECHOSTR


# --- V3: second official key set -----


def test_v3_url_verification() -> None:
    echo = v3().verify_and_decrypt(V3_VERIFY_SIGNATURE, V3_VERIFY_TIMESTAMP, V3_VERIFY_NONCE, V3_ECHOSTR)
    assert echo == V3_ECHO_PLAINTEXT


def test_v3_message_with_chinese_text() -> None:
    plain = v3().verify_and_decrypt(V3_SIGNATURE, V3_TIMESTAMP, V3_NONCE, V3_ENCRYPT)
    assert plain == V3_PLAINTEXT
    assert "你好" in plain


def test_v3_key_set_rejects_v2_echostr() -> None:
    with pytest.raises(CallbackCryptoError):
        v3().verify_and_decrypt(V2_SIGNATURE, V2_TIMESTAMP, V2_NONCE, V2_ECHOSTR)


# --- V4: JSON sample (not valid JSON) -----


def test_v4_decrypts_to_exact_non_json_string() -> None:
    assert v3().verify_and_decrypt(V4_SIGNATURE, V4_TIMESTAMP, V4_NONCE, V4_ENCRYPT) == V4_PLAINTEXT


# --- V5: wechatpy vectors -----


def test_v5_check_signature_and_echo() -> None:
    echo = v5().verify_and_decrypt(V5_VERIFY_SIGNATURE, V5_VERIFY_TIMESTAMP, V5_VERIFY_NONCE, V5_ECHOSTR)
    assert echo == V5_ECHO_PLAINTEXT


def test_v5_check_signature_negative_nonce() -> None:
    with pytest.raises(CallbackCryptoError) as err:
        v5().verify_signature(V5_VERIFY_SIGNATURE, V5_VERIFY_TIMESTAMP, "437374424", V5_ECHOSTR)
    assert err.value.code == SIGNATURE_MISMATCH


def test_v5_decrypt_message_pad_one() -> None:
    assert v5().verify_and_decrypt(V5_SIGNATURE, V5_TIMESTAMP, V5_NONCE, V5_ENCRYPT) == V5_PLAINTEXT


def test_v5_deterministic_passive_reply_byte_for_byte() -> None:
    encrypted, signature = v5().encrypt_and_sign(
        V5_REPLY_PLAINTEXT, V5_TIMESTAMP, V5_NONCE, random_prefix=FIXED_PREFIX
    )
    assert encrypted == V5_REPLY_ENCRYPT
    assert signature == V5_REPLY_SIGNATURE
    assert passive_reply_xml(encrypted, signature, V5_TIMESTAMP, V5_NONCE) == (
        "<xml>\n"
        f"<Encrypt><![CDATA[{V5_REPLY_ENCRYPT}]]></Encrypt>\n"
        f"<MsgSignature><![CDATA[{V5_REPLY_SIGNATURE}]]></MsgSignature>\n"
        f"<TimeStamp>{V5_TIMESTAMP}</TimeStamp>\n"
        f"<Nonce><![CDATA[{V5_NONCE}]]></Nonce>\n"
        "</xml>"
    )
    assert v5().decrypt(encrypted) == V5_REPLY_PLAINTEXT


# --- V6: AI-bot style, receiveid "" (round trip) -----


def test_v6_encrypt_matches_and_round_trips() -> None:
    crypto = CallbackCrypto(V1_TOKEN, V1_KEY, "")
    encrypted, signature = crypto.encrypt_and_sign(
        V6_PLAINTEXT, V6_TIMESTAMP, V6_NONCE, random_prefix=FIXED_PREFIX
    )
    assert encrypted == V6_ENCRYPT
    assert signature == V6_SIGNATURE
    assert crypto.verify_and_decrypt(V6_SIGNATURE, V6_TIMESTAMP, V6_NONCE, V6_ENCRYPT) == V6_PLAINTEXT


def test_v6_echostr() -> None:
    crypto = CallbackCrypto(V1_TOKEN, V1_KEY, "")
    assert crypto.verify_and_decrypt(V6_ECHO_SIGNATURE, V6_TIMESTAMP, V6_NONCE, V6_ECHOSTR) == "echo-ok"
    assert crypto.encrypt("echo-ok", random_prefix=FIXED_PREFIX) == V6_ECHOSTR


def test_v6_corp_receiveid_rejects_empty_receiveid_payload() -> None:
    with pytest.raises(CallbackCryptoError) as err:
        v1().decrypt(V6_ENCRYPT)
    assert err.value.code == RECEIVEID_MISMATCH


def test_random_prefix_round_trip_is_not_deterministic() -> None:
    crypto = v1()
    first, second = crypto.encrypt(V1_PLAINTEXT), crypto.encrypt(V1_PLAINTEXT)
    assert first != second
    assert crypto.decrypt(first) == crypto.decrypt(second) == V1_PLAINTEXT


def test_cbc_on_the_reused_ecb_context_matches_a_fresh_cbc_context() -> None:
    """`decrypt` runs CBC on one reused ECB context; it must equal a fresh CBC decryptor for any length."""
    import os
    import threading

    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    crypto = CallbackCrypto(V1_TOKEN, V1_KEY, V1_CORP)
    key = base64.b64decode(V1_KEY + "=")
    samples = [os.urandom(16 * n) for n in (1, 2, 3, 7, 32, 200) for _ in range(5)]

    def reference(raw: bytes) -> bytes:
        decryptor = Cipher(algorithms.AES(key), modes.CBC(key[:16])).decryptor()
        return decryptor.update(raw) + decryptor.finalize()

    for raw in samples:
        assert crypto._cbc_decrypt(raw) == reference(raw)
    failures: list[object] = []

    def hammer() -> None:
        try:
            for _ in range(200):
                for raw in samples:
                    if crypto._cbc_decrypt(raw) != reference(raw):
                        failures.append(raw)
        except Exception as exc:  # e.g. a context shared between threads
            failures.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert crypto.decrypt(V1_ENCRYPT) == V1_PLAINTEXT  # and the context still decrypts real callbacks
