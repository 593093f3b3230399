"use strict";
// The error browser's whole script. Data comes from the JSON block and is only ever shown through
// text nodes and attributes (never innerHTML), so a subtitle holding markup stays text.
// State lives in the URL hash (#cell=angry,happy&split=labelled&missing=faces&sort=loss-desc&page=2):
// a view can be linked, reloaded, and reached by tests without clicking.
(() => {
  const data = JSON.parse(document.getElementById("mer-data").textContent);
  const CLASSES = data.classes, STORES = data.stores, SCALE = data.scale, PAGE = data.page_size;
  const REFINE_USE = data.refine_use;
  const REFINE_NOTE = {  // unknown (the page was made without train's metrics.json): no note
    unused: "(not trained on: train.use_refined is off, the gold label trained)",
    trained: "(trained so: flagged clips left out of training)",
    in_folds: "(on every label; each training fold refined again without the clips it scores)",
  };
  const SORTS = ["loss-desc", "loss-asc", "conf-asc", "conf-desc", "name"];
  const SPLITS = ["all", "labelled", "unlabelled", "candidate"];
  const MISSING = ["any", "none", "some", ...STORES];
  const clips = data.rows.map((row) => {
    const clip = {};
    data.columns.forEach((key, j) => { clip[key] = row[j]; });
    clip.pred = clip.probs.indexOf(Math.max(...clip.probs));
    clip.scored = clip.kind === "labelled_oof";  // out of fold: the only predictions the matrix counts
    return clip;
  });
  const defaults = { cell: null, split: "all", missing: "any", sort: "loss-desc", page: 0 };
  let state = { ...defaults };

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else node.setAttribute(key, value);
    }
    for (const child of children) node.append(child);  // strings become text nodes
    return node;
  }
  const pct = (value) => (100 * value / SCALE).toFixed(1) + "%";

  function readHash() {
    const params = new URLSearchParams(location.hash.slice(1));
    const next = { ...defaults };
    const cell = (params.get("cell") || "").split(",");
    if (cell.length === 2 && CLASSES.includes(cell[0]) && CLASSES.includes(cell[1])) {
      next.cell = [CLASSES.indexOf(cell[0]), CLASSES.indexOf(cell[1])];
    }
    if (SPLITS.includes(params.get("split"))) next.split = params.get("split");
    if (MISSING.includes(params.get("missing"))) next.missing = params.get("missing");
    if (SORTS.includes(params.get("sort"))) next.sort = params.get("sort");
    next.page = Math.max(0, parseInt(params.get("page") || "1", 10) - 1 || 0);
    state = next;
  }

  function writeHash() {  // by hand, not URLSearchParams, so the cell reads "#cell=angry,happy"
    const parts = [];
    const put = (key, value) => parts.push(key + "=" + encodeURIComponent(value).replace(/%2C/g, ","));
    if (state.cell) put("cell", CLASSES[state.cell[0]] + "," + CLASSES[state.cell[1]]);
    for (const key of ["split", "missing", "sort"]) if (state[key] !== defaults[key]) put(key, state[key]);
    if (state.page) put("page", String(state.page + 1));
    history.replaceState(null, "", parts.length ? "#" + parts.join("&") : location.pathname);
  }

  function matches(clip) {
    if (state.cell && !(clip.scored && clip.gold === state.cell[0] && clip.pred === state.cell[1])) return false;
    if (state.split === "candidate" ? !clip.candidate : state.split !== "all" && clip.split !== state.split) return false;
    if (state.missing === "none") return clip.missing.length === 0;
    if (state.missing === "some") return clip.missing.length > 0;
    return state.missing === "any" || clip.missing.includes(state.missing);
  }

  function compare(a, b) {
    const byName = a.name < b.name ? -1 : a.name > b.name ? 1 : 0;
    const nullsLast = (x, y, sign) => (x === null) - (y === null) || (x === null ? 0 : sign * (x - y));
    switch (state.sort) {
      case "loss-desc": return nullsLast(a.loss, b.loss, -1) || byName;
      case "loss-asc": return nullsLast(a.loss, b.loss, 1) || byName;
      case "conf-asc": return a.confidence - b.confidence || byName;
      case "conf-desc": return b.confidence - a.confidence || byName;
      default: return byName;
    }
  }

  function buildMatrix() {
    const counts = CLASSES.map(() => CLASSES.map(() => 0));
    for (const clip of clips) if (clip.scored && clip.gold !== null) counts[clip.gold][clip.pred] += 1;
    const most = Math.max(1, ...counts.flat());
    const table = document.getElementById("matrix");
    const head = el("tr", {}, el("th", { class: "axis", text: "gold \\ predicted" }));
    CLASSES.forEach((name) => head.append(el("th", { class: "col", scope: "col", text: name })));
    table.append(head);
    CLASSES.forEach((gold, g) => {
      const row = el("tr", {}, el("th", { scope: "row", text: gold }));
      CLASSES.forEach((pred, p) => {
        const share = counts[g][p] / most;
        const button = el("button", {
          type: "button", "data-gold": gold, "data-pred": pred, text: String(counts[g][p]),
          title: counts[g][p] + " clips: gold " + gold + ", predicted " + pred,
          style: "background: rgba(31, 111, 235, " + (0.08 + 0.85 * share).toFixed(3) + ")",
          class: (g === p ? "diag" : "") + (share > 0.55 ? " dark" : ""),
        });
        button.addEventListener("click", () => {
          const same = state.cell && state.cell[0] === g && state.cell[1] === p;
          state = { ...state, cell: same ? null : [g, p], page: 0 };
          update();
        });
        row.append(el("td", {}, button));
      });
      table.append(row);
    });
  }

  function bars(kind, caption, labels, values, mark) {
    const box = el("div", { class: "bars " + kind }, el("span", { class: "caption", text: caption }));
    labels.forEach((label, i) => {
      const value = values[i];
      const cls = mark(i);
      box.append(el("span", { class: cls, text: label }));
      if (value === null) {
        box.append(el("span", { class: "absent", text: "missing" }), el("span", {}));
        return;
      }
      box.append(el("span", { class: "track " + cls }, el("span", { class: "fill", style: "display:block;width:" + pct(value) })),
                 el("span", { class: "num", text: pct(value) }));
    });
    return box;
  }

  function card(clip) {
    const verdict = clip.scored ? (clip.gold === clip.pred ? " right" : " wrong") : "";
    const node = el("article", { class: "card" + verdict, "data-name": clip.name,
                                 "data-gold": clip.gold === null ? "" : CLASSES[clip.gold], "data-pred": CLASSES[clip.pred] });
    node.append(el("div", { class: "thumb" }, clip.thumb
      ? el("img", { src: clip.thumb, alt: "middle frame", loading: "lazy", width: "160" })
      : el("div", { class: "nothumb", text: "no thumbnail (no video)" })));
    const body = el("div", { class: "body" }, el("h2", { class: "name", text: clip.name }));
    const badges = [clip.split === "labelled" ? "labelled" : "unlabelled"];
    if (clip.candidate) badges.push("candidate");
    if (clip.kind === "prior_no_modality") badges.push("training prior: no usable modality");
    else badges.push(clip.scored ? "out of fold" : "fold average");
    badges.forEach((text) => body.append(el("span", { class: "badge", text })));
    const labels = el("p", { class: "labels" });
    if (clip.gold !== null) labels.append("gold ", el("b", { text: CLASSES[clip.gold] }), " · ");
    // what the refine stage said, and whether training followed it (train's metrics.json)
    if (clip.refined !== null) labels.append(REFINE_USE === "unused" ? "refine suggests " : "refined ", el("b", { text: CLASSES[clip.refined] }), " · ");
    if (clip.dropped) labels.append("flagged by refine · ");
    if ((clip.refined !== null || clip.dropped) && REFINE_NOTE[REFINE_USE]) labels.append(el("span", { class: "note", text: REFINE_NOTE[REFINE_USE] }), " · ");
    labels.append("predicted ", el("b", { text: CLASSES[clip.pred] }), " " + pct(clip.confidence));
    if (clip.loss !== null) labels.append(" · loss " + clip.loss.toFixed(2) + " nats");
    body.append(labels);
    for (const [lang, text] of [["zh", clip.chinese], ["en", clip.english]]) {
      body.append(el("p", { class: "sub " + lang + (text ? "" : " empty"), lang, text: text || "(no " + lang + " subtitle)" }));
    }
    const panels = el("div", { class: "panels" });
    panels.append(bars("probs", "class probabilities", CLASSES, clip.probs, (i) => (i === clip.pred ? "pred" : "") + (i === clip.gold ? " gold" : "")));
    if (STORES.length) panels.append(bars("w", "modality weights (fusion share)", STORES, clip.weights, () => ""));
    body.append(panels);
    if (clip.missing.length) body.append(el("p", { class: "missing", text: "modalities missing: " + clip.missing.join(", ") }));
    if (clip.failures.length) {
      const list = el("ul", { class: "failures" });
      // a file without the store's track lacks the modality (the stage counts it so), it did not fail
      for (const [stage, kind, error] of clip.failures) {
        const track = kind === "no_audio_track" || kind === "no_video_track";
        list.append(el("li", { class: track ? "track" : "", text: stage + " · " + kind + (track ? " (not a failure)" : "") + ": " + error }));
      }
      body.append(list);
    }
    node.append(body);
    return node;
  }

  function pager(total) {
    const pages = Math.max(1, Math.ceil(total / PAGE));
    for (const nav of document.querySelectorAll(".pager")) {
      const prev = el("button", { type: "button", class: "prev", text: "‹ previous" });
      const next = el("button", { type: "button", class: "next", text: "next ›" });
      prev.disabled = state.page === 0;
      next.disabled = state.page >= pages - 1;
      prev.addEventListener("click", () => { state = { ...state, page: state.page - 1 }; update(); });
      next.addEventListener("click", () => { state = { ...state, page: state.page + 1 }; update(); });
      nav.replaceChildren(prev, el("span", { class: "page", text: "page " + (state.page + 1) + " of " + pages }), next);
    }
  }

  function render() {
    const shown = clips.filter(matches).sort(compare);
    state.page = Math.min(state.page, Math.max(0, Math.ceil(shown.length / PAGE) - 1));
    for (const key of ["split", "missing", "sort"]) document.getElementById(key).value = state[key];
    for (const button of document.querySelectorAll("#matrix button")) {
      const on = state.cell && button.dataset.gold === CLASSES[state.cell[0]] && button.dataset.pred === CLASSES[state.cell[1]];
      button.classList.toggle("selected", Boolean(on));
    }
    document.getElementById("cell-note").textContent = state.cell
      ? "cell: gold " + CLASSES[state.cell[0]] + ", predicted " + CLASSES[state.cell[1]] + " (click it again to clear)" : "";
    document.getElementById("count").textContent = shown.length + " of " + clips.length + " clips";
    const list = document.getElementById("list");
    list.replaceChildren(...shown.slice(state.page * PAGE, (state.page + 1) * PAGE).map(card));
    pager(shown.length);
    document.body.dataset.ready = "1";
  }

  function update() { writeHash(); render(); }

  function setup() {
    document.getElementById("title").textContent = data.title;
    document.title = data.title;
    const labelled = clips.filter((c) => c.scored).length;
    const candidates = clips.filter((c) => c.candidate).length;
    document.getElementById("summary").textContent = clips.length + " clips · " + labelled + " scored out of fold · " +
      candidates + " candidates · stores: " + (STORES.join(", ") || "none");
    const missing = document.getElementById("missing");
    missing.append(el("option", { value: "any", text: "any" }), el("option", { value: "none", text: "none missing" }),
                   el("option", { value: "some", text: "at least one missing" }));
    STORES.forEach((store) => missing.append(el("option", { value: store, text: store + " missing" })));
    for (const key of ["split", "missing", "sort"]) {
      document.getElementById(key).addEventListener("change", (event) => {
        state = { ...state, [key]: event.target.value, page: 0 };
        update();
      });
    }
    document.getElementById("clear").addEventListener("click", () => { state = { ...defaults }; update(); });
    window.addEventListener("hashchange", () => { readHash(); render(); });
    buildMatrix();
    readHash();
    render();
  }

  setup();
})();
