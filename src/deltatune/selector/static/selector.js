// The selector: tick modules or add them by name/regex; the server (same origin, per-session token) reports the
// positions in model order and what the delta would cost, and receives the final list on Submit.
"use strict";

const data = JSON.parse(document.getElementById("data").textContent);
const treeRoot = document.getElementById("tree");
const selection = new Set();
let positions = [];

async function call(route, body) {
  const response = await fetch(route, {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-Deltatune-Token": data.token },
    body: JSON.stringify(body),
  });
  const answer = await response.json();
  if (!response.ok) throw new Error(answer.error || response.statusText);
  return answer;
}

let pending = 0;
async function changed() {
  refreshCheckboxes(treeRoot, selection);
  const ticket = ++pending;
  const error = document.getElementById("error");
  try {
    const answer = await call("/api/cost", { modules: [...selection] });
    if (ticket !== pending) return;  // a newer change is on its way
    positions = answer.positions;
    document.getElementById("cost").textContent = answer.parameters.toLocaleString("en");
    error.textContent = "";
  } catch (problem) {
    if (ticket !== pending) return;
    positions = [...selection];
    document.getElementById("cost").textContent = "–";
    error.textContent = problem.message;
  }
  document.getElementById("count").textContent = positions.length;
  document.getElementById("modules").textContent = JSON.stringify(positions, null, 1);
}

async function matching() {
  const spec = document.getElementById("spec").value.trim();
  if (!spec) return [];
  return (await call("/api/match", { spec })).names;
}

async function preview() {
  const note = document.getElementById("preview");
  try {
    const names = await matching();
    note.textContent = names.length ? names.length + " match: " + names.slice(0, 3).join(", ") +
      (names.length > 3 ? ", …" : "") : "";
  } catch (problem) {
    note.textContent = problem.message;
  }
}

async function edit(add) {
  try {
    for (const name of await matching()) add ? selection.add(name) : selection.delete(name);
    changed();
  } catch (problem) {
    document.getElementById("preview").textContent = problem.message;
  }
}

document.getElementById("selection-pane").hidden = false;
document.getElementById("delta-type").textContent = data.delta_type;
renderTree(data, treeRoot, selection, changed);
document.getElementById("spec").addEventListener("input", preview);
document.getElementById("add").addEventListener("click", () => edit(true));
document.getElementById("remove").addEventListener("click", () => edit(false));
document.getElementById("clear").addEventListener("click", () => { selection.clear(); changed(); });
document.getElementById("submit").addEventListener("click", async () => {
  const status = document.getElementById("status");
  try {
    await call("/api/submit", { modules: positions });
    status.textContent = "Submitted " + positions.length + " modules. You can close this page.";
    for (const control of document.querySelectorAll("input, button")) control.disabled = true;
  } catch (problem) {
    status.textContent = problem.message;
  }
});
changed();
