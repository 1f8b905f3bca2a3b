"""The sidebar's HTML, CSS and JavaScript (vanilla, no inline code: the CSP allows scripts from 'self' and the
JS-SDK's own origin only). Values from the server are escaped here; the JS builds DOM nodes with textContent."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape


def esc(value: object) -> str:
    return escape("" if value is None else str(value), quote=True)


def page(*, csrf: str, staff_name: str, sdk_urls: Sequence[str]) -> str:
    sdk = "\n".join(f'<script src="{esc(url)}"></script>' for url in sdk_urls)
    return f"""<!doctype html>
<html lang="zh-CN">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>话术助手</title>
<link rel="stylesheet" href="/sidebar/static/sidebar.css">
<link rel="icon" href="/sidebar/static/favicon.svg" type="image/svg+xml">
</head>
<body data-csrf="{esc(csrf)}">
<header><h1>话术助手</h1><span class="who">{esc(staff_name)}</span></header>
<p id="status" class="status" role="status">正在连接企业微信…</p>
<section id="subject" hidden>
  <h2 id="subject-title"></h2>
  <div id="tags" class="tags" aria-label="标签"></div>
  <p id="audience-note" class="note" hidden>暂无标签，显示默认话术</p>
</section>
<section id="scripts-section" hidden>
  <input id="search" type="search" placeholder="搜索话术（输入客户问题或关键词）" maxlength="100" autocomplete="off">
  <ul id="scripts" class="scripts"></ul>
  <p id="empty" class="note" hidden>没有可用的话术</p>
  <details id="skipped-box" hidden><summary>未列出的话术</summary><ul id="skipped" class="skipped"></ul></details>
</section>
<p id="result" class="result" role="status" aria-live="polite"></p>
{sdk}
<script src="/sidebar/static/sidebar.js"></script>
</body>
</html>
"""


def message_page(title: str, message: str) -> str:
    return f"""<!doctype html>
<html lang="zh-CN">
<head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title><link rel="stylesheet" href="/sidebar/static/sidebar.css">
<link rel="icon" href="/sidebar/static/favicon.svg" type="image/svg+xml"></head>
<body><header><h1>话术助手</h1></header><h2>{esc(title)}</h2><p class="message">{esc(message)}</p></body>
</html>
"""


CSS = """
body { font: 14px/1.5 -apple-system, "PingFang SC", "Microsoft YaHei", sans-serif; margin: 0; padding: 8px 12px;
  color: #1f2329; background: #fff; }
header { display: flex; align-items: baseline; justify-content: space-between; border-bottom: 1px solid #e5e6eb; }
h1 { font-size: 16px; margin: 4px 0 8px; }
h2 { font-size: 14px; margin: 10px 0 6px; }
.who { color: #646a73; font-size: 12px; }
.status { color: #646a73; }
.status.error, .result.error { color: #d83931; }
.result.ok { color: #2ea121; }
.tags { display: flex; flex-wrap: wrap; gap: 4px; }
.tag { background: #e8f3ff; color: #245bdb; border-radius: 10px; padding: 0 8px; font-size: 12px; }
.note { color: #8f959e; font-size: 12px; }
input[type=search] { box-sizing: border-box; width: 100%; padding: 6px 8px; margin: 8px 0; border: 1px solid #d0d3d6;
  border-radius: 4px; font: inherit; }
.scripts { list-style: none; padding: 0; margin: 0; }
.scripts li { border: 1px solid #e5e6eb; border-radius: 6px; padding: 8px; margin-bottom: 8px; }
.scripts .title { font-weight: 600; }
.scripts .variant { color: #8f959e; font-size: 12px; margin-left: 6px; }
.scripts .text { white-space: pre-wrap; margin: 4px 0; color: #373c43; }
.scripts button { font: inherit; padding: 2px 12px; border: 0; border-radius: 4px; background: #3370ff; color: #fff;
  cursor: pointer; }
.scripts button:disabled { background: #bbbfc4; cursor: default; }
.skipped { color: #8f959e; font-size: 12px; padding-left: 16px; }
.message { color: #373c43; }
"""


JS = r"""
(function () {
  "use strict";
  var body = document.body;
  var csrf = body.getAttribute("data-csrf") || "";
  var statusEl = document.getElementById("status");
  var resultEl = document.getElementById("result");
  var sdk = window.ww || window.wx;
  var JS_API_LIST = ["getContext", "getCurExternalContact", "getCurExternalChat", "sendChatMessage"];
  var chat = null; // {kind: "single"|"group", id}
  var searchTimer = null;
  var generation = 0;

  function setStatus(text, isError) {
    statusEl.textContent = text;
    statusEl.className = isError ? "status error" : "status";
    statusEl.hidden = !text;
  }

  function setResult(text, ok) {
    resultEl.textContent = text;
    resultEl.className = ok ? "result ok" : "result error";
  }

  function errorText(res) {
    if (!res) { return ""; }
    return String(res.err_msg || res.errMsg || "");
  }

  function invoke(name, params) {
    return new Promise(function (resolve, reject) {
      sdk.invoke(name, params || {}, function (res) {
        if (res && (res.err_msg === name + ":ok" || res.errMsg === name + ":ok")) { resolve(res); }
        else { reject(new Error(name + " " + errorText(res))); }
      });
    });
  }

  function getJson(url) {
    return fetch(url, {credentials: "same-origin", headers: {"Accept": "application/json"}}).then(function (r) {
      return r.json().then(function (data) {
        if (!r.ok) { throw new Error(data && data.message ? data.message : "HTTP " + r.status); }
        return data;
      });
    });
  }

  function configure(cfg) {
    return new Promise(function (resolve, reject) {
      function agent() {
        sdk.agentConfig({
          corpid: cfg.corpid,
          agentid: cfg.agentid,
          timestamp: cfg.timestamp,
          nonceStr: cfg.nonceStr,
          signature: cfg.agentSignature,
          jsApiList: JS_API_LIST,
          success: function () { resolve(); },
          fail: function (res) { reject(new Error("agentConfig " + errorText(res))); }
        });
      }
      if (typeof sdk.config === "function" && typeof sdk.ready === "function") {
        sdk.config({beta: true, debug: false, appId: cfg.corpid, timestamp: cfg.timestamp, nonceStr: cfg.nonceStr,
          signature: cfg.signature, jsApiList: JS_API_LIST});
        if (typeof sdk.error === "function") {
          sdk.error(function (res) { reject(new Error("config " + errorText(res))); });
        }
        sdk.ready(agent);
      } else {
        agent();
      }
    });
  }

  function clear(el) { while (el.firstChild) { el.removeChild(el.firstChild); } }

  function renderSubject(data) {
    document.getElementById("subject").hidden = false;
    var title = data.kind === "group" ? "客户群" : "客户";
    if (data.name) { title += "：" + data.name; }
    document.getElementById("subject-title").textContent = title;
    var tags = document.getElementById("tags");
    clear(tags);
    data.tags.forEach(function (t) {
      var span = document.createElement("span");
      span.className = "tag";
      span.textContent = t;
      tags.appendChild(span);
    });
    document.getElementById("audience-note").hidden = data.tags.length > 0;
  }

  function renderScripts(data) {
    document.getElementById("scripts-section").hidden = false;
    var list = document.getElementById("scripts");
    clear(list);
    data.scripts.forEach(function (s) {
      var li = document.createElement("li");
      li.setAttribute("data-script", s.id);
      li.setAttribute("data-variant", s.variant);
      var head = document.createElement("div");
      var title = document.createElement("span");
      title.className = "title";
      title.textContent = s.title;
      var variant = document.createElement("span");
      variant.className = "variant";
      variant.textContent = s.variant;
      head.appendChild(title);
      head.appendChild(variant);
      li.appendChild(head);
      s.texts.forEach(function (text) {
        var p = document.createElement("p");
        p.className = "text";
        p.textContent = text;
        li.appendChild(p);
      });
      var button = document.createElement("button");
      button.type = "button";
      button.textContent = "发送到聊天";
      button.addEventListener("click", function () { insert(s, button); });
      li.appendChild(button);
      list.appendChild(li);
    });
    document.getElementById("empty").hidden = data.scripts.length > 0;
    var skipped = document.getElementById("skipped");
    clear(skipped);
    data.skipped.forEach(function (s) {
      var li = document.createElement("li");
      li.textContent = s.title + "（" + s.variant + "）：" + s.reason;
      skipped.appendChild(li);
    });
    document.getElementById("skipped-box").hidden = data.skipped.length === 0;
  }

  function load(q) {
    var mine = ++generation;
    var params = new URLSearchParams();
    params.set(chat.kind === "group" ? "chat_id" : "external_userid", chat.id);
    if (q) { params.set("q", q); }
    return getJson("/sidebar/api/context?" + params.toString()).then(function (data) {
      if (mine !== generation) { return; }
      renderSubject(data);
      renderScripts(data);
      setStatus("", false);
    });
  }

  function record(s, ok, error) {
    return fetch("/sidebar/api/inserted", {
      method: "POST",
      credentials: "same-origin",
      headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf, "Accept": "application/json"},
      body: JSON.stringify({script_id: s.id, variant: s.variant, chat: chat.kind, chat_id: chat.id, ok: ok,
        error: error || ""})
    });
  }

  function insert(s, button) {
    button.disabled = true;
    setResult("正在发送…", true);
    var chain = Promise.resolve();
    s.texts.forEach(function (text) {
      chain = chain.then(function () {
        return invoke("sendChatMessage", {msgtype: "text", enterChat: false, text: {content: text}});
      });
    });
    // recorded first, then shown: what the staff member sees as done is also counted
    chain.then(function () {
      return record(s, true, "").catch(function () { return null; }).then(function () {
        setResult("已发送：" + s.title, true);
      });
    }, function (err) {
      return record(s, false, err.message).catch(function () { return null; }).then(function () {
        setResult("发送失败：" + err.message, false);
      });
    }).then(function () { button.disabled = false; });
  }

  function start() {
    if (!sdk || typeof sdk.invoke !== "function" || typeof sdk.agentConfig !== "function") {
      setStatus("请在企业微信客户端的聊天工具栏中打开本页面", true);
      return;
    }
    var url = location.href.split("#")[0];
    getJson("/sidebar/api/jssdk-config?url=" + encodeURIComponent(url))
      .then(configure)
      .then(function () { return invoke("getContext"); })
      .then(function (res) {
        if (res.entry === "single_chat_tools") {
          return invoke("getCurExternalContact").then(function (r) { return {kind: "single", id: r.userId}; });
        }
        if (res.entry === "group_chat_tools") {
          return invoke("getCurExternalChat").then(function (r) { return {kind: "group", id: r.chatId}; });
        }
        throw new Error("请在与客户的单聊或客户群聊天中打开（当前入口：" + (res.entry || "未知") + "）");
      })
      .then(function (c) {
        chat = c;
        setStatus("正在加载话术…", false);
        return load("");
      })
      .catch(function (err) { setStatus("加载失败：" + err.message, true); });

    document.getElementById("search").addEventListener("input", function (event) {
      var q = event.target.value.trim();
      if (searchTimer) { clearTimeout(searchTimer); }
      searchTimer = setTimeout(function () {
        if (chat) { load(q).catch(function (err) { setStatus("加载失败：" + err.message, true); }); }
      }, 200);
    });
  }

  start();
})();
"""
