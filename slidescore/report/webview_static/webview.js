// slidescore serve: a small tile viewer (no dependencies). The view is {x, y, zoom}: the level-0
// pixel at the viewport centre and screen px per level-0 px. Tiles of 256 px come from the server
// (/tile/L/ty/tx.jpg, /overlay/c/L/ty/tx.png) and are placed by CSS transform; region outlines are
// SVG paths in level-0 px (GeoJSON [x, y]). The view state is mirrored on #viewer as
// data-view-x / data-view-y / data-view-zoom / data-level; #region=N (the hash) centres region N.
'use strict';
(function () {
  const $ = (id) => document.getElementById(id);
  const viewer = $('viewer'), slideBg = $('slide-bg'), slide = $('slide'), overlay = $('overlay');
  const shapes = $('outline-shapes'), labels = $('outline-labels'), svg = $('outlines');
  const SVGNS = 'http://www.w3.org/2000/svg';
  const MAX_ZOOM = 16, CACHE = 800;
  const view = {x: 0, y: 0, zoom: 1};
  let info = null, regions = [], selected = null, minZoom = 0.001, queued = false;
  let anchor = null; // 'fit' or a region's rank while the view is exactly that (kept on resize); null once moved
  const showClass = [];
  const cache = new Map(); // key → img (insertion order = least recently used first)

  const getJSON = (url) => fetch(url).then((r) => {
    if (!r.ok) throw new Error(url + ': HTTP ' + r.status);
    return r.json();
  });

  function size() { return [viewer.clientWidth || 1, viewer.clientHeight || 1]; }

  function fitZoom() {
    const [w, h] = size();
    return Math.min(w / info.width, h / info.height) * 0.95;
  }

  function setView(x, y, zoom, keep) {
    anchor = keep === undefined ? null : keep;
    view.zoom = Math.min(MAX_ZOOM, Math.max(minZoom, zoom));
    view.x = Math.min(info.width, Math.max(0, x));
    view.y = Math.min(info.height, Math.max(0, y));
    render();
  }

  function fit() { setView(info.width / 2, info.height / 2, fitZoom(), 'fit'); }

  function schedule() {
    if (queued) return;
    queued = true;
    requestAnimationFrame(() => { queued = false; render(); });
  }

  // the level whose pixels are the coarsest still no larger than a screen pixel (level 0 when zoomed in further)
  function pickLevel() {
    const want = 1 / (view.zoom * (window.devicePixelRatio || 1));
    let best = info.levels[0];
    for (const lv of info.levels) if (lv.downsample <= want * 1.0001 && lv.downsample > best.downsample) best = lv;
    return best;
  }

  function tileImg(key, src) {
    let img = cache.get(key);
    if (img) { cache.delete(key); cache.set(key, img); return img; }
    img = new Image();
    img.draggable = false;
    img.alt = '';
    img.decoding = 'async';
    img.addEventListener('load', () => { img.dataset.loaded = '1'; });
    img.addEventListener('error', () => { img.classList.add('missing'); });
    img.src = src;
    cache.set(key, img);
    if (cache.size > CACHE) {
      for (const [k, old] of cache) {
        if (cache.size <= CACHE) break;
        if (!old.isConnected) cache.delete(k);
      }
    }
    return img;
  }

  // place the visible tiles of one level into a container (its other children are removed)
  function placeTiles(container, lv, urlOf, keyOf, cls) {
    const [w, h] = size();
    const t = info.tile_px, step = t * lv.downsample, z = view.zoom;
    const x0 = view.x - w / 2 / z, y0 = view.y - h / 2 / z;
    const nx = Math.ceil(lv.width / t), ny = Math.ceil(lv.height / t);
    const tx0 = Math.max(0, Math.floor(x0 / step)), tx1 = Math.min(nx - 1, Math.floor((x0 + w / z) / step));
    const ty0 = Math.max(0, Math.floor(y0 / step)), ty1 = Math.min(ny - 1, Math.floor((y0 + h / z) / step));
    const keep = new Set();
    for (let ty = ty0; ty <= ty1; ty++) {
      for (let tx = tx0; tx <= tx1; tx++) {
        const img = tileImg(keyOf(ty, tx), urlOf(ty, tx));
        img.className = cls + (img.classList.contains('missing') ? ' missing' : '');
        img.dataset.level = lv.level;
        // level-0 edges of the tile (clipped at the image edge), then screen px, rounded so tiles abut
        const ex0 = tx * step, ex1 = Math.min(lv.width, (tx + 1) * t) * lv.downsample;
        const ey0 = ty * step, ey1 = Math.min(lv.height, (ty + 1) * t) * lv.downsample;
        const sx0 = Math.round((ex0 - x0) * z), sx1 = Math.round((ex1 - x0) * z);
        const sy0 = Math.round((ey0 - y0) * z), sy1 = Math.round((ey1 - y0) * z);
        img.style.width = (sx1 - sx0) + 'px';
        img.style.height = (sy1 - sy0) + 'px';
        img.style.transform = 'translate(' + sx0 + 'px,' + sy0 + 'px)';
        keep.add(img);
        if (img.parentNode !== container) container.appendChild(img);
      }
    }
    for (const child of Array.from(container.children)) if (!keep.has(child)) child.remove();
    return keep.size;
  }

  function render() {
    if (!info) return;
    const lv = pickLevel();
    const coarse = info.levels[info.levels.length - 1];
    const tileUrl = (l) => (ty, tx) => '/tile/' + l.level + '/' + ty + '/' + tx + '.jpg';
    const tileKey = (l) => (ty, tx) => 't/' + l.level + '/' + ty + '/' + tx;
    // the coarsest level underneath, so there is always something while the finer tiles load
    if (coarse !== lv) placeTiles(slideBg, coarse, tileUrl(coarse), tileKey(coarse), 'tile bg');
    else slideBg.replaceChildren();
    const n = placeTiles(slide, lv, tileUrl(lv), tileKey(lv), 'tile');
    // one container per shown class so their tiles stack; hidden classes get none
    const wanted = [];
    info.classes.forEach((c) => {
      if (!showClass[c.index]) return;
      let box = overlay.querySelector('[data-class="' + c.index + '"]');
      if (!box) { box = document.createElement('div'); box.className = 'layer'; box.dataset.class = c.index; overlay.appendChild(box); }
      placeTiles(box, lv, (ty, tx) => '/overlay/' + c.index + '/' + lv.level + '/' + ty + '/' + tx + '.png',
        (ty, tx) => 'o/' + c.index + '/' + lv.level + '/' + ty + '/' + tx, 'overlay-tile');
      wanted.push(box);
    });
    for (const box of Array.from(overlay.children)) if (!wanted.includes(box)) box.remove();
    drawOutlines();
    drawScale();
    viewer.dataset.viewX = view.x.toFixed(2);
    viewer.dataset.viewY = view.y.toFixed(2);
    viewer.dataset.viewZoom = view.zoom.toPrecision(6);
    viewer.dataset.level = lv.level;
    viewer.dataset.tiles = n;
    $('status').textContent = 'level ' + lv.level + ' · ' + (100 * view.zoom).toPrecision(3) + '% · ' +
      (info.mpp0 / view.zoom).toPrecision(3) + ' µm per screen px';
  }

  function drawOutlines() {
    const [w, h] = size();
    const z = view.zoom, x0 = view.x - w / 2 / z, y0 = view.y - h / 2 / z;
    svg.setAttribute('width', w);
    svg.setAttribute('height', h);
    shapes.setAttribute('transform', 'scale(' + z + ') translate(' + (-x0) + ' ' + (-y0) + ')');
    labels.replaceChildren();
    if (!$('show-outlines').checked) { shapes.style.display = 'none'; return; }
    shapes.style.display = '';
    for (const r of regions) {
      const [by, bx, bh, bw] = r.bbox;
      const sx = (bx - x0) * z, sy = (by - y0) * z;
      if (sx > w || sy > h || sx + bw * z < 0 || sy + bh * z < 0) continue;
      const t = document.createElementNS(SVGNS, 'text');
      t.setAttribute('x', Math.max(2, sx + 2));
      t.setAttribute('y', Math.max(12, sy - 3));
      t.textContent = '#' + r.rank;
      labels.appendChild(t);
    }
  }

  function drawScale() {
    const target = 120 * info.mpp0 / view.zoom; // µm spanned by ~120 screen px
    const p = Math.pow(10, Math.floor(Math.log10(target)));
    const nice = [1, 2, 5, 10].map((m) => m * p).filter((v) => v <= target).pop() || p;
    $('scalebar-bar').style.width = (nice / info.mpp0 * view.zoom) + 'px';
    $('scalebar-text').textContent = nice >= 1000 ? (nice / 1000) + ' mm' : nice + ' µm';
  }

  function pathData(geom) {
    const polys = geom.type === 'Polygon' ? [geom.coordinates] : geom.type === 'MultiPolygon' ? geom.coordinates : [];
    let d = '';
    for (const rings of polys) for (const ring of rings) d += 'M' + ring.map((p) => p[0] + ' ' + p[1]).join('L') + 'Z';
    return d;
  }

  function goRegion(rank) {
    const r = regions.find((q) => q.rank === rank);
    if (!r) return false;
    const [by, bx, bh, bw] = r.bbox;
    const [w, h] = size();
    selected = rank;
    for (const li of $('regions').children) li.classList.toggle('selected', Number(li.dataset.rank) === rank);
    for (const p of shapes.children) p.classList.toggle('selected', Number(p.dataset.rank) === rank);
    viewer.dataset.region = rank;
    setView(bx + bw / 2, by + bh / 2, Math.min(w / (3 * bw), h / (3 * bh), 4), rank);
    return true;
  }

  function applyHash() {
    const m = /(?:^#|&)region=(\d+)/.exec(location.hash);
    if (m) goRegion(Number(m[1]));
  }

  function buildRegions(geo) {
    regions = (geo.features || []).map((f, i) => {
      const p = f.properties || {}, ms = p.measurements || {};
      const cls = (p.classification || {}).name || '';
      return {rank: Math.round(ms.rank || i + 1), cls: cls, color: (p.classification || {}).color || [255, 200, 0],
        peak: ms.peak_probability, area: ms.area_um2, bbox: p.bbox_px || bboxOf(f.geometry), geom: f.geometry};
    }).sort((a, b) => a.rank - b.rank);
    const list = $('regions');
    list.replaceChildren();
    shapes.replaceChildren();
    for (const r of regions) {
      const cls = info.classes.find((c) => c.name === r.cls);
      const color = cls ? cls.color : 'rgb(' + r.color.join(',') + ')';
      const li = document.createElement('li');
      li.dataset.rank = r.rank;
      li.className = 'region';
      const b = document.createElement('button');
      b.type = 'button';
      b.style.borderLeftColor = color;
      b.textContent = '#' + r.rank + ' ' + r.cls + ' · peak ' + (r.peak == null ? '–' : r.peak.toFixed(2)) +
        ' · ' + (r.area == null ? '–' : Math.round(r.area).toLocaleString('en')) + ' µm²';
      b.addEventListener('click', () => { history.replaceState(null, '', '#region=' + r.rank); goRegion(r.rank); });
      li.appendChild(b);
      list.appendChild(li);
      const path = document.createElementNS(SVGNS, 'path');
      path.setAttribute('d', pathData(r.geom));
      path.setAttribute('stroke', color);
      path.dataset.rank = r.rank;
      shapes.appendChild(path);
    }
    $('region-count').textContent = '(' + regions.length + ')';
  }

  function bboxOf(geom) {
    const pts = [];
    const walk = (a) => { if (typeof a[0] === 'number') pts.push(a); else a.forEach(walk); };
    walk(geom.coordinates || []);
    const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
    const x = Math.min(...xs), y = Math.min(...ys);
    return [y, x, Math.max(...ys) - y, Math.max(...xs) - x];
  }

  function buildControls() {
    $('title').textContent = info.sample_id;
    $('source').textContent = info.source + ' · ' + info.width + ' × ' + info.height + ' px · ' + info.mpp0 + ' µm/px';
    const box = $('classes');
    box.replaceChildren();
    for (const c of info.classes) {
      showClass[c.index] = true;
      const label = document.createElement('label');
      label.className = 'row';
      const cb = document.createElement('input');
      cb.type = 'checkbox';
      cb.checked = true;
      cb.dataset.class = c.index;
      cb.addEventListener('change', () => { showClass[c.index] = cb.checked; render(); });
      const sw = document.createElement('span');
      sw.className = 'swatch';
      sw.style.background = c.color;
      label.append(cb, sw, document.createTextNode(' ' + c.name + (c.threshold == null ? '' : ' (threshold ' + c.threshold + ')')));
      box.appendChild(label);
    }
    const op = $('opacity');
    const setOpacity = () => { overlay.style.opacity = op.value / 100; $('opacity-value').textContent = op.value + '%'; };
    op.addEventListener('input', setOpacity);
    setOpacity();
    $('show-outlines').addEventListener('change', render);
    $('fit').addEventListener('click', fit);
    $('zoom-in').addEventListener('click', () => setView(view.x, view.y, view.zoom * 2));
    $('zoom-out').addEventListener('click', () => setView(view.x, view.y, view.zoom / 2));
  }

  function bindPointer() {
    viewer.addEventListener('wheel', (e) => {
      e.preventDefault();
      const r = viewer.getBoundingClientRect(), [w, h] = size();
      const mx = e.clientX - r.left - w / 2, my = e.clientY - r.top - h / 2;
      const px = view.x + mx / view.zoom, py = view.y + my / view.zoom; // the level-0 point under the cursor stays put
      const z = Math.min(MAX_ZOOM, Math.max(minZoom, view.zoom * Math.exp(-e.deltaY * (e.deltaMode ? 0.05 : 0.0015))));
      view.zoom = z;
      anchor = null;
      view.x = Math.min(info.width, Math.max(0, px - mx / z));
      view.y = Math.min(info.height, Math.max(0, py - my / z));
      schedule();
    }, {passive: false});
    let drag = null;
    viewer.addEventListener('pointerdown', (e) => {
      if (e.button !== 0) return;
      drag = {x: e.clientX, y: e.clientY};
      viewer.setPointerCapture(e.pointerId);
      viewer.classList.add('dragging');
    });
    viewer.addEventListener('pointermove', (e) => {
      if (!drag) return;
      anchor = null;
      view.x = Math.min(info.width, Math.max(0, view.x - (e.clientX - drag.x) / view.zoom));
      view.y = Math.min(info.height, Math.max(0, view.y - (e.clientY - drag.y) / view.zoom));
      drag = {x: e.clientX, y: e.clientY};
      schedule();
    });
    const end = () => { drag = null; viewer.classList.remove('dragging'); };
    viewer.addEventListener('pointerup', end);
    viewer.addEventListener('pointercancel', end);
    viewer.addEventListener('dblclick', (e) => {
      const r = viewer.getBoundingClientRect(), [w, h] = size();
      setView(view.x + (e.clientX - r.left - w / 2) / view.zoom, view.y + (e.clientY - r.top - h / 2) / view.zoom, view.zoom * 2);
    });
    viewer.addEventListener('keydown', (e) => {
      const step = 100 / view.zoom;
      const moves = {ArrowLeft: [-step, 0], ArrowRight: [step, 0], ArrowUp: [0, -step], ArrowDown: [0, step]};
      if (moves[e.key]) setView(view.x + moves[e.key][0], view.y + moves[e.key][1], view.zoom);
      else if (e.key === '+' || e.key === '=') setView(view.x, view.y, view.zoom * 2);
      else if (e.key === '-') setView(view.x, view.y, view.zoom / 2);
      else return;
      e.preventDefault();
    });
    window.addEventListener('resize', () => {
      if (anchor === 'fit') fit(); // the whole slide stays fitted (or the region centred) until the view is moved
      else if (anchor !== null) goRegion(anchor);
      else schedule();
    });
    window.addEventListener('hashchange', applyHash);
  }

  Promise.all([getJSON('/info.json'), getJSON('/regions.geojson')]).then(([i, geo]) => {
    info = i;
    minZoom = Math.min(fitZoom() / 4, 1);
    buildControls();
    buildRegions(geo);
    bindPointer();
    fit();
    applyHash();
    viewer.dataset.ready = '1';
  }).catch((err) => {
    $('status').textContent = 'error: ' + err.message;
    viewer.dataset.error = err.message;
  });
})();
