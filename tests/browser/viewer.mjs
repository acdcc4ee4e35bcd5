// Loads one exported model with three.js's own loaders (GLTFLoader, or MTLLoader + OBJLoader), the way a
// browser glTF viewer does, renders it from the cameras in /config.json and hands the pictures back.
//
// /config.json: { model: url, kind: "glb" | "obj", mtl: url (obj only), size: px, shading: "unlit" | "lit",
//                 views: [{ eye: [x,y,z], target: [x,y,z], up: [x,y,z], fov: deg (vertical), near, far }] }
// Result in window.__result: { images: [PNG data URLs], info: { meshes, vertices, triangles, bbox_min,
//                 bbox_max, materials: [{ type, map, map_size, map_color_space, metalness, roughness }] } },
// or window.__error on failure.
import * as THREE from "three";
import { GLTFLoader } from "three/addons/loaders/GLTFLoader.js";
import { OBJLoader } from "three/addons/loaders/OBJLoader.js";
import { MTLLoader } from "three/addons/loaders/MTLLoader.js";

async function loadModel(cfg) {
  if (cfg.kind === "glb") {
    const gltf = await new GLTFLoader().loadAsync(cfg.model);
    return gltf.scene;
  }
  const materials = await new MTLLoader().loadAsync(cfg.mtl);
  materials.preload();
  return new OBJLoader().setMaterials(materials).loadAsync(cfg.model);
}

// MTLLoader starts its texture downloads in the background (GLTFLoader waits for its own): wait until every
// map has its image, or a render could show untextured (black) surfaces.
async function texturesReady(root, timeoutMs = 30000) {
  const maps = [];
  root.traverse((o) => { if (o.isMesh && o.material.map) maps.push(o.material.map); });
  const t0 = performance.now();
  while (maps.some((m) => !m.image || m.image.complete === false)) {
    if (performance.now() - t0 > timeoutMs) throw new Error("a texture did not load");
    await new Promise((ok) => setTimeout(ok, 20));
  }
}

function describe(root) {
  const info = { meshes: 0, vertices: 0, triangles: 0, materials: [] };
  root.traverse((o) => {
    if (!o.isMesh) return;
    info.meshes += 1;
    const g = o.geometry;
    info.vertices += g.attributes.position.count;
    info.triangles += (g.index ? g.index.count : g.attributes.position.count) / 3;
    const m = o.material;
    info.materials.push({
      type: m.type,
      map: !!m.map,
      map_size: m.map && m.map.image ? [m.map.image.width, m.map.image.height] : null,
      map_color_space: m.map ? m.map.colorSpace : null,
      metalness: m.metalness ?? null,
      roughness: m.roughness ?? null,
      vertex_colors: !!m.vertexColors,
    });
  });
  const box = new THREE.Box3().setFromObject(root);
  info.bbox_min = box.min.toArray();
  info.bbox_max = box.max.toArray();
  return info;
}

function makeUnlit(root) {
  root.traverse((o) => {
    if (!o.isMesh) return;
    const m = o.material;
    o.material = new THREE.MeshBasicMaterial({
      map: m.map || null,
      vertexColors: !!m.vertexColors,
      side: THREE.DoubleSide,
    });
  });
}

async function main() {
  const cfg = await (await fetch("/config.json")).json();
  const root = await loadModel(cfg);
  await texturesReady(root);
  const info = describe(root);
  if (cfg.shading === "unlit") makeUnlit(root);
  const scene = new THREE.Scene();
  scene.add(root);
  if (cfg.shading !== "unlit") {
    scene.add(new THREE.HemisphereLight(0xffffff, 0x444444, 2.0));
    const sun = new THREE.DirectionalLight(0xffffff, 1.5);
    sun.position.set(1, 2, 3);
    scene.add(sun);
  }
  const renderer = new THREE.WebGLRenderer({ antialias: false, alpha: true, preserveDrawingBuffer: true });
  renderer.setPixelRatio(1);
  renderer.setSize(cfg.size, cfg.size);
  renderer.setClearColor(0x000000, 0);
  renderer.outputColorSpace = THREE.SRGBColorSpace;
  document.body.appendChild(renderer.domElement);
  const images = [];
  for (const v of cfg.views) {
    const cam = new THREE.PerspectiveCamera(v.fov, 1, v.near, v.far);
    cam.position.fromArray(v.eye);
    cam.up.fromArray(v.up);
    cam.lookAt(new THREE.Vector3().fromArray(v.target));
    renderer.render(scene, cam);
    images.push(renderer.domElement.toDataURL("image/png"));
  }
  window.__result = { images, info };
}

main().catch((e) => { window.__error = String(e && e.stack ? e.stack : e); });
