// Renders the folded module tree (JSON from deltatune.visualization) as a collapsible list.  Every name is set
// with textContent, never as HTML, so a module called "<script>" stays text.  With a selection (a Set of full
// module names), each node gets a checkbox that ticks every module it stands for.
"use strict";

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function shape(param) {
  return el("span", "param " + param.state, param.name + ":[" + param.shape.join(",") + "]");
}

function makeCheckbox(names, selection, onChange, title) {
  const box = el("input");
  box.type = "checkbox";
  box.dataset.names = JSON.stringify(names);
  if (title) box.title = title;
  box.addEventListener("change", () => {
    for (const name of names) box.checked ? selection.add(name) : selection.delete(name);
    onChange();
  });
  return box;
}

function renderNode(node, selection, onChange, depth) {
  const item = el("li");
  item.dataset.label = node.label || node.kind;
  const hasBody = node.children.length > 0 || node.deltas.length > 0;
  const toggle = el("span", "toggle", hasBody ? "▸" : "");
  item.appendChild(toggle);
  if (selection && node.names.length && node.names[0] !== "") {
    item.appendChild(makeCheckbox(node.names, selection, onChange, node.names.length + " modules"));
  }
  item.appendChild(el("span", "label", node.label || node.kind));
  if (node.label) item.appendChild(el("span", "kind", " (" + node.kind + ")"));
  for (const member of node.members) {
    const chip = el("label", "member");
    chip.dataset.member = member.label;
    if (selection) chip.appendChild(makeCheckbox(member.names, selection, onChange));
    chip.appendChild(document.createTextNode(member.label));
    item.appendChild(chip);
  }
  for (const param of node.params) item.appendChild(shape(param));
  if (node.common.length) item.appendChild(el("span", "common", "= " + node.common.join(",")));
  if (hasBody) {
    const list = el("ul");
    for (const delta of node.deltas) {
      const line = el("li");
      line.appendChild(el("span", "delta", "+ " + delta.name + " (" + delta.kind + ", " + delta.route + ")"));
      for (const param of delta.params) line.appendChild(shape(param));
      list.appendChild(line);
    }
    for (const child of node.children) list.appendChild(renderNode(child, selection, onChange, depth + 1));
    item.appendChild(list);
    if (depth > 0) item.classList.add("collapsed");
    toggle.textContent = depth > 0 ? "▸" : "▾";
    toggle.addEventListener("click", () => {
      item.classList.toggle("collapsed");
      toggle.textContent = item.classList.contains("collapsed") ? "▸" : "▾";
    });
  }
  return item;
}

function refreshCheckboxes(root, selection) {
  for (const box of root.querySelectorAll("input[type=checkbox]")) {
    const names = JSON.parse(box.dataset.names);
    const ticked = names.filter((name) => selection.has(name)).length;
    box.checked = ticked === names.length;
    box.indeterminate = ticked > 0 && ticked < names.length;
  }
}

function renderTree(data, container, selection, onChange) {
  document.getElementById("title").textContent = data.model;
  const t = data.totals;
  document.getElementById("totals").textContent =
    "backbone " + t.backbone.toLocaleString("en") + " · trainable " + t.trainable.toLocaleString("en") +
    " · delta " + t.delta.toLocaleString("en") + " · delta checkpoint " + t.checkpoint_bytes.toLocaleString("en") + " B";
  container.appendChild(renderNode(data.tree, selection, onChange, 0));
}
