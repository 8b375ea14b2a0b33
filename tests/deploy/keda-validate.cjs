// Validates KEDA ScaledObjects (a JSON array on stdin) with the validator
// npm's @kubernetes-models/keda compiles from KEDA's CRD (installed by
// tests/deploy/run.sh into $DEPLOY_KEDA_TOOLS). Prints one line per problem
// and exits 1 when there is any.
//
// That validator accepts fields the CRD does not name; the API server's
// strict field validation refuses them. Strict here: every object is read
// through a Proxy, and a field the validator never looked at is not in the
// CRD (its compiled code reads each property the schema names, and every
// key of a map such as a trigger's metadata).
"use strict";
const fs = require("fs");

const tools = process.env.DEPLOY_KEDA_TOOLS;
if (!tools) {
  console.log("DEPLOY_KEDA_TOOLS is not set (tests/deploy/run.sh sets it)");
  process.exit(1);
}
const { ScaledObject } = require(
  require.resolve("@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject", { paths: [tools] }),
);

// The object, and the paths of its fields the validator read.
function watched(value, path, read) {
  if (value === null || typeof value !== "object") return value;
  const children = {};
  return new Proxy(value, {
    get(target, key, receiver) {
      if (typeof key === "string" && Object.prototype.hasOwnProperty.call(target, key)) {
        read.add(`${path}/${key}`);
        if (!(key in children)) children[key] = watched(target[key], `${path}/${key}`, read);
        return children[key];
      }
      return Reflect.get(target, key, receiver);
    },
  });
}

function fields(value, path, out) {
  if (value === null || typeof value !== "object") return out;
  for (const [key, child] of Object.entries(value)) {
    out.push(`${path}/${key}`);
    fields(child, `${path}/${key}`, out);
  }
  return out;
}

const problems = [];
const objects = JSON.parse(fs.readFileSync(0, "utf8"));
for (const object of objects) {
  const name = `ScaledObject ${object?.metadata?.name}`;
  const read = new Set();
  try {
    // ScaledObject#validate() on the object itself: `new ScaledObject(o)`
    // would copy every field, reading even those the CRD does not name.
    ScaledObject.prototype.validate.call(watched(object, "", read));
  } catch (e) {
    if (!Array.isArray(e.errors)) throw e;
    for (const error of e.errors) {
      problems.push(`${name}: ${error.instancePath || "/"}: ${error.message}`);
    }
  }
  for (const field of fields(object, "", [])) {
    const parent = field.slice(0, field.lastIndexOf("/"));
    // Report the outermost unknown field only.
    if (!read.has(field) && (parent === "" || read.has(parent))) {
      problems.push(`${name}: ${field}: unknown field (not in KEDA's CRD)`);
    }
  }
}
for (const problem of problems) console.log(problem);
process.exit(problems.length ? 1 : 0);
