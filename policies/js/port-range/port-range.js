// port-range, in JavaScript: the twin of policies/port-range (Rust).
//
// Forwarded host ports must lie inside the operator's range. Settings (all
// optional):
// - `min`, `max` (default 1024 and 65535): the range, inclusive;
// - `mode` (default "reject"): "reject" refuses a task with a host port
//   outside the range, "clamp" moves such a port to the nearest free port
//   inside it;
// - `allow_privileged` (default false): host ports below 1024 are refused in
//   either mode unless this is true (and a range reaching below 1024 is a
//   settings error without it).
//
// Built into a WebAssembly component by build.sh (componentize-js); passes
// the Rust twin's CASES.toml through `qemu-executor policy test`.
//
// The component model's conventions in JavaScript: the `evaluator` interface
// is an exported object whose methods are the WIT functions in lowerCamelCase;
// record fields arrive in lowerCamelCase (`hostIp`), enum cases as strings
// ("tcp"), variants as `{ tag, val }`; a function returning `result` returns
// for `ok` and throws for `err`.

const NAME = "port-range";
const VERSION = "0.1.0";
/** Ports below this need privileges to bind. */
const FIRST_UNPRIVILEGED = 1024;
const FIELDS = ["min", "max", "mode", "allow_privileged"];

class SettingsError extends Error {}

function port(settings, key, fallback) {
  if (!(key in settings)) return fallback;
  const value = settings[key];
  if (!Number.isInteger(value) || value < 0 || value > 65535) {
    throw new SettingsError(`${key}: ${JSON.stringify(value)} is not a port number (0 to 65535)`);
  }
  return value;
}

/** Parses and checks settings as the host passes them ("" means {}). */
function parseSettings(text) {
  let raw;
  try {
    raw = text.trim() === "" ? {} : JSON.parse(text);
  } catch (e) {
    throw new SettingsError(`not valid JSON: ${e.message}`);
  }
  if (raw === null || typeof raw !== "object" || Array.isArray(raw)) {
    throw new SettingsError("expected a JSON object");
  }
  for (const key of Object.keys(raw)) {
    if (!FIELDS.includes(key)) {
      throw new SettingsError(`unknown field \`${key}\`, expected one of ${FIELDS.map((f) => `\`${f}\``).join(", ")}`);
    }
  }
  const s = {
    min: port(raw, "min", FIRST_UNPRIVILEGED),
    max: port(raw, "max", 65535),
    mode: "mode" in raw ? raw.mode : "reject",
    allowPrivileged: "allow_privileged" in raw ? raw.allow_privileged : false,
  };
  if (s.mode !== "reject" && s.mode !== "clamp") {
    throw new SettingsError(`unknown variant ${JSON.stringify(s.mode)} for mode, expected \`reject\` or \`clamp\``);
  }
  if (typeof s.allowPrivileged !== "boolean") {
    throw new SettingsError("allow_privileged: expected true or false");
  }
  if (s.min === 0) throw new SettingsError("min must be at least 1");
  if (s.min > s.max) throw new SettingsError(`min (${s.min}) is greater than max (${s.max})`);
  if (s.min < FIRST_UNPRIVILEGED && !s.allowPrivileged) {
    throw new SettingsError(
      `min (${s.min}) is a privileged port; set allow_privileged = true to allow ports below ${FIRST_UNPRIVILEGED}`,
    );
  }
  return s;
}

/**
 * The port inside min..=max nearest to ports[i].host (the bound it crossed,
 * then onwards, wrapping around) that no other forward of the same protocol
 * and address uses; undefined when every port is taken.
 */
function freePort(ports, i, min, max) {
  const p = ports[i];
  const taken = (candidate) =>
    ports.some((q, j) => j !== i && q.host === candidate && q.protocol === p.protocol && q.hostIp === p.hostIp);
  const len = max - min + 1;
  // Downwards from max when the port was above the range, upwards from min
  // otherwise, so that the first candidate is the bound it crossed.
  const down = p.host > max;
  const first = Math.min(Math.max(p.host, min), max) - min;
  for (let k = 0; k < len; k++) {
    const offset = down ? (first + len - (k % len)) % len : (first + k) % len;
    if (!taken(min + offset)) return min + offset;
  }
  return undefined;
}

function evaluate(task, s) {
  const refused = [];
  const outOfRange = [];
  task.ports.forEach((p, i) => {
    if (p.host < FIRST_UNPRIVILEGED && !s.allowPrivileged) {
      refused.push(`ports[${i}].host ${p.host} is a privileged port (below ${FIRST_UNPRIVILEGED})`);
    } else if (p.host < s.min || p.host > s.max) {
      outOfRange.push(i);
    }
  });
  if (s.mode === "reject") {
    for (const i of outOfRange) {
      refused.push(`ports[${i}].host ${task.ports[i].host} is outside the allowed range ${s.min}-${s.max}`);
    }
  }
  if (refused.length > 0) return { tag: "reject", val: refused.join("; ") };
  if (outOfRange.length === 0) return { tag: "accept" };

  const ports = task.ports.map((p) => ({ ...p }));
  const moves = [];
  for (const i of outOfRange) {
    const free = freePort(ports, i, s.min, s.max);
    if (free === undefined) {
      return {
        tag: "reject",
        val: `ports[${i}].host ${task.ports[i].host} is outside the allowed range ${s.min}-${s.max} and no port in it is free`,
      };
    }
    moves.push(`ports[${i}].host ${task.ports[i].host} -> ${free}`);
    ports[i].host = free;
  }
  return {
    tag: "rewrite",
    val: {
      task: { ...task, ports },
      reason: `moved into the allowed range ${s.min}-${s.max}: ${moves.join(", ")}`,
    },
  };
}

export const evaluator = {
  metadata() {
    return { name: NAME, version: VERSION, rewrites: true };
  },

  checkSettings(settings) {
    try {
      parseSettings(settings);
    } catch (e) {
      throw `Bad settings for ${NAME}: ${e.message}`;
    }
  },

  evaluate(task, _facts, settings) {
    let s;
    try {
      s = parseSettings(settings);
    } catch (e) {
      return { tag: "reject", val: `Bad settings for ${NAME}: ${e.message}` };
    }
    return evaluate(task, s);
  },
};
