// Run gallery (flows/gallery.py): one card per results row, filters, and a three.js viewer for the GLBs.
//
// The page is static: its data is the JSON in #gallery-data; three.js (vendored, unmodified ES modules) is in
// window.CRM_THREE_SOURCES and is linked at run time through blob URLs, which works from file:// as well as
// from a web or object-store origin. Meshes are fetched from their (relative or presigned) links; a page
// opened from file:// cannot fetch, so it loads the model's base64 copy (gallery/models/<id>.js, a classic
// script) instead. Everything shown from the data goes through textContent / attributes, never innerHTML.
//
// State for tests and tools: window.crmGallery = { data, state, visible(), open(id), close(),
//   viewer: { state: "closed" | "loading" | "ready" | "error", id, error, triangles } }.
"use strict";
(function () {
  const data = JSON.parse(document.getElementById("gallery-data").textContent);
  const PAGE = 120;
  const state = { filter: "all", query: "", shown: PAGE };
  const gallery = { data, state, viewer: { state: "closed", id: null, error: null, triangles: 0 } };
  window.crmGallery = gallery;

  const $ = (sel) => document.querySelector(sel);
  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children) if (c) e.appendChild(c);
    return e;
  }

  // ------------------------------------------------------------------------------------------- filters
  const isFlagged = (r) => r.status === "ok" && r.flags.length > 0;
  const FILTERS = {
    all: () => true,
    ok: (r) => r.status === "ok" && r.flags.length === 0,
    flagged: isFlagged,
    failed: (r) => r.status !== "ok",
  };
  function matches(r) {
    if (!FILTERS[state.filter](r)) return false;
    if (!state.query) return true;
    const q = state.query.toLowerCase();
    return r.id.toLowerCase().includes(q) || r.flags.some((f) => f.includes(q)) ||
      (r.error || "").toLowerCase().includes(q);
  }
  gallery.visible = () => data.rows.filter(matches);

  function fmt(kind, v) {
    if (v === null || v === undefined) return "\u2013";
    if (kind === "int") return Number(v).toLocaleString("en-US");
    if (kind === "percent") return (100 * v).toFixed(1) + " %";
    if (kind === "db") return v.toFixed(1) + " dB";
    if (kind === "ratio") return v.toFixed(1);
    return Number(v).toFixed(3);
  }

  // --------------------------------------------------------------------------------------------- cards
  function card(r) {
    const flagged = isFlagged(r);
    const open = r.glb ? () => gallery.open(r.id) : null;
    const thumbs = el("div", { class: "thumbs", onclick: open, title: r.glb ? "open the 3-D viewer" : null });
    if (r.preview) thumbs.appendChild(el("img", { class: "preview", src: r.preview, loading: "lazy", alt: "preview" }));
    else thumbs.appendChild(el("div", { class: "empty", text: r.status === "ok" ? "no preview" : "no output" }));
    if (r.input) thumbs.appendChild(el("img", { class: "input", src: r.input, loading: "lazy", alt: "input" }));
    if (r.glb) thumbs.appendChild(el("button", { class: "open3d", text: "3D", title: "open the 3-D viewer" }));

    const body = el("div", { class: "body" },
      el("div", { class: "title" }, el("span", { class: "id", text: r.id }),
        el("span", { class: "badge " + (r.status === "ok" ? "ok" : "failed"), text: r.status })));
    if (r.error) body.appendChild(el("div", { class: "error", text: r.error }));
    const rows = [];
    for (const [name, label, kind, flag] of data.values) {
      const v = r.qc[name];
      if ((v === null || v === undefined) && !r.notes[name]) continue;
      const bad = flag && r.flags.includes(flag);
      rows.push(el("tr", { class: bad ? "bad" : null, title: r.notes[name] || null },
        el("td", { text: label }), el("td", { class: "v", text: fmt(kind, v) })));
    }
    if (rows.length) body.appendChild(el("table", { class: "qc" }, el("tbody", {}, ...rows)));
    if (r.flags.length) {
      body.appendChild(el("div", { class: "flags" },
        ...r.flags.map((f) => el("span", { class: "flag", text: f, title: data.flags[f] || f }))));
    }
    const links = Object.entries(r.links || {});
    if (links.length) {
      body.appendChild(el("div", { class: "links" },
        ...links.map(([name, href]) => el("a", { href, text: name, target: "_blank", rel: "noopener" }))));
    }
    const cls = "card " + (r.status === "ok" ? "ok" : "failed") + (flagged ? " flagged" : "");
    return el("div", { class: cls, "data-id": r.id, "data-status": r.status }, thumbs, body);
  }

  function render() {
    const rows = gallery.visible();
    const box = $("#cards");
    box.replaceChildren(...rows.slice(0, state.shown).map(card));
    $("#more").style.display = rows.length > state.shown ? "block" : "none";
    $("#more").textContent = `Show more (${rows.length - state.shown} left)`;
    $("#shown").textContent = `${Math.min(rows.length, state.shown)} of ${rows.length} shown`;
    for (const b of document.querySelectorAll(".filters button")) {
      b.classList.toggle("active", b.dataset.filter === state.filter);
    }
  }

  function setup() {
    document.title = data.title;
    $("#title").textContent = data.title;
    $("#run").textContent = `${data.run} \u00b7 written ${data.generated_utc}`;
    if (data.notice) $("#notice").textContent = data.notice;
    const filters = $(".filters");
    for (const name of ["all", "ok", "flagged", "failed"]) {
      const n = data.rows.filter(FILTERS[name]).length;
      filters.appendChild(el("button", { "data-filter": name, onclick: () => {
        state.filter = name; state.shown = PAGE; render();
      } }, document.createTextNode(name), el("span", { class: "count", text: String(n) })));
    }
    $("#search").addEventListener("input", (e) => { state.query = e.target.value.trim(); state.shown = PAGE; render(); });
    $("#more").addEventListener("click", () => { state.shown += PAGE; render(); });
    $("#viewer-close").addEventListener("click", () => gallery.close());
    $("#viewer").addEventListener("click", (e) => { if (e.target.id === "viewer") gallery.close(); });
    document.addEventListener("keydown", (e) => {
      if (!$("#viewer").classList.contains("open")) return;
      if (e.key === "Escape") gallery.close();
      if (e.key === "ArrowRight" || e.key === "ArrowLeft") step(e.key === "ArrowRight" ? 1 : -1);
    });
    render();
  }

  // -------------------------------------------------------------------------------------------- viewer
  let three = null;
  async function loadThree() {
    if (three) return three;
    const src = window.CRM_THREE_SOURCES;
    if (!src) throw new Error("three.js is missing from this page");
    const urls = {};
    for (const [file, deps] of data.three_link) {
      let code = src[file];
      for (const [spec, dep] of Object.entries(deps)) code = code.split(`from '${spec}'`).join(`from '${urls[dep]}'`);
      urls[file] = URL.createObjectURL(new Blob([code], { type: "text/javascript" }));
    }
    const [THREE, gltf, orbit] = await Promise.all(
      ["three.module.js", "GLTFLoader.js", "OrbitControls.js"].map((f) => import(urls[f])));
    three = { THREE, GLTFLoader: gltf.GLTFLoader, OrbitControls: orbit.OrbitControls };
    return three;
  }

  function embedded(r) {
    return new Promise((resolve, reject) => {
      window.crmGalleryModels = window.crmGalleryModels || {};
      const s = el("script", { src: r.model });
      s.onload = () => {
        const b64 = window.crmGalleryModels[r.id];
        delete window.crmGalleryModels[r.id];
        s.remove();
        if (!b64) return reject(new Error(`${r.model} holds no model for ${r.id}`));
        const bin = atob(b64);
        const bytes = new Uint8Array(bin.length);
        for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
        resolve(bytes.buffer);
      };
      s.onerror = () => { s.remove(); reject(new Error(`could not load ${r.model}`)); };
      document.head.appendChild(s);
    });
  }

  async function meshBytes(r) {
    if (location.protocol === "file:") {
      if (r.model) return embedded(r);
      throw new Error("a page opened from a file cannot read mesh.glb and this model was not embedded: " +
        "serve the run folder (python -m http.server -d RUN) or rebuild the page with embedded models");
    }
    const resp = await fetch(r.glb);
    if (!resp.ok) throw new Error(`HTTP ${resp.status} for ${r.id}/mesh.glb`);
    return resp.arrayBuffer();
  }

  let view = null; // { renderer, scene, camera, controls, model, frame }
  function ensureView(t) {
    if (view) return view;
    const { THREE, OrbitControls } = t;
    const canvas = $("#viewer-canvas");
    const renderer = new THREE.WebGLRenderer({ canvas, antialias: true, preserveDrawingBuffer: true });
    renderer.setPixelRatio(1);
    const scene = new THREE.Scene();
    scene.background = new THREE.Color(0x2b2e33);
    scene.add(new THREE.HemisphereLight(0xffffff, 0x60646a, 2.2));
    const camera = new THREE.PerspectiveCamera(35, 4 / 3, 0.01, 100);
    const key = new THREE.DirectionalLight(0xffffff, 1.4);
    key.position.set(1, 2, 3);
    camera.add(key);
    scene.add(camera);
    const controls = new OrbitControls(camera, canvas);
    view = { renderer, scene, camera, controls, model: null, frame: 0 };
    return view;
  }

  function dispose(obj) {
    obj.traverse((o) => {
      if (!o.isMesh) return;
      o.geometry.dispose();
      for (const m of [].concat(o.material)) { if (m.map) m.map.dispose(); m.dispose(); }
    });
  }

  function loop() {
    if (!view || !$("#viewer").classList.contains("open")) return;
    const canvas = view.renderer.domElement;
    const w = canvas.clientWidth, h = canvas.clientHeight;
    if (canvas.width !== w || canvas.height !== h) {
      view.renderer.setSize(w, h, false);
      view.camera.aspect = w / h;
      view.camera.updateProjectionMatrix();
    }
    view.controls.update();
    view.renderer.render(view.scene, view.camera);
    view.frame = requestAnimationFrame(loop);
  }

  let opening = 0;
  gallery.open = async function (id) {
    const r = data.rows.find((x) => x.id === id);
    if (!r || !r.glb) return;
    const token = ++opening;
    const v = gallery.viewer;
    Object.assign(v, { state: "loading", id, error: null, triangles: 0 });
    $("#viewer").classList.add("open");
    $("#viewer-title").textContent = r.id;
    $("#viewer-status").textContent = "loading\u2026";
    try {
      const t = await loadThree();
      const bytes = await meshBytes(r);
      const gltf = await new t.GLTFLoader().parseAsync(bytes, "");
      if (token !== opening) return; // another model was opened meanwhile
      const vw = ensureView(t);
      if (vw.model) { vw.scene.remove(vw.model); dispose(vw.model); }
      vw.model = gltf.scene;
      vw.scene.add(vw.model);
      const box = new t.THREE.Box3().setFromObject(vw.model);
      const center = box.getCenter(new t.THREE.Vector3());
      const radius = Math.max(box.getSize(new t.THREE.Vector3()).length() / 2, 1e-3);
      const dist = radius / Math.sin((vw.camera.fov * Math.PI) / 360) * 1.05;
      vw.camera.near = dist / 100; vw.camera.far = dist * 10;
      vw.camera.position.set(center.x, center.y + 0.35 * dist, center.z + 0.94 * dist); // glTF front: +Z
      vw.camera.updateProjectionMatrix();
      vw.controls.target.copy(center);
      let triangles = 0;
      vw.model.traverse((o) => {
        if (o.isMesh) triangles += (o.geometry.index ? o.geometry.index.count : o.geometry.attributes.position.count) / 3;
      });
      cancelAnimationFrame(vw.frame);
      loop();
      Object.assign(v, { state: "ready", triangles });
      $("#viewer-status").textContent =
        `${triangles.toLocaleString("en-US")} triangles \u00b7 drag to orbit, scroll to zoom, \u2190 \u2192 next`;
    } catch (err) {
      if (token !== opening) return;
      Object.assign(v, { state: "error", error: String(err && err.message ? err.message : err) });
      $("#viewer-status").textContent = "could not show this model: " + v.error;
    }
  };

  gallery.close = function () {
    opening++;
    $("#viewer").classList.remove("open");
    if (view) cancelAnimationFrame(view.frame);
    Object.assign(gallery.viewer, { state: "closed" });
  };

  function step(delta) {
    const rows = gallery.visible().filter((r) => r.glb);
    const i = rows.findIndex((r) => r.id === gallery.viewer.id);
    if (rows.length) gallery.open(rows[(i + delta + rows.length) % rows.length].id);
  }

  setup();
})();
