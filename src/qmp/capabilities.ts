/**
 * What a QEMU can do, read from its own `query-qmp-schema` and `query-migrate-capabilities`.
 *
 * QEMU hides the names of its QAPI types from the schema it reports (to keep them free to change):
 * `MirrorCopyMode` appears as an anonymous type such as "290". Commands, events and member names
 * are stable, so an enum is found by where it is used: `blockdev-mirror:copy-mode`. enumValues()
 * accepts such a path, and also the usual QAPI names of the enums ferry cares about, each mapped to
 * a path below.
 */
import { z } from 'zod';
import type { SchemaInfo } from './commands.js';

export interface QmpCapabilities {
  commands: ReadonlySet<string>;
  events: ReadonlySet<string>;
  hasCommand(name: string): boolean;
  /** A top-level argument of a command, including the members of its union's variants. */
  hasArgument(command: string, argument: string): boolean;
  /**
   * Values of an enum, by QAPI name ('MirrorCopyMode', 'MigrationCapability', see `enumPaths`)
   * or by a path `command-or-event:member.member[]...`; `return.` starts at a command's reply.
   * Undefined when this QEMU has no such enum.
   */
  enumValues(typeName: string): ReadonlySet<string> | undefined;
  migrationCapabilities: ReadonlySet<string>;
  /** A parameter migrate-set-parameters accepts. */
  hasMigrationParameter(name: string): boolean;
}

/** Where each well-known QAPI enum is used, since the schema does not name it. */
export const enumPaths: Readonly<Record<string, string>> = {
  MirrorCopyMode: 'blockdev-mirror:copy-mode',
  MirrorSyncMode: 'blockdev-mirror:sync',
  BlockdevOnError: 'blockdev-mirror:on-source-error',
  MigrationCapability: 'migrate-set-capabilities:capabilities[].capability',
  MigrationStatus: 'migrate-continue:state',
  MultiFDCompression: 'migrate-set-parameters:multifd-compression',
  RunState: 'query-status:return.status',
  JobStatus: 'JOB_STATUS_CHANGE:status',
  JobType: 'query-jobs:return[].type',
  BlockExportType: 'block-export-add:type',
  BlockExportRemoveMode: 'block-export-del:mode',
  BlockdevDriver: 'blockdev-add:driver',
  ShutdownCause: 'SHUTDOWN:reason',
  QMPCapability: 'qmp_capabilities:enable[]',
};

const memberSchema = z.object({ name: z.string(), type: z.string() });
const objectSchema = z.object({
  members: z.array(memberSchema),
  variants: z.array(z.object({ case: z.string(), type: z.string() })).optional(),
});
const enumSchema = z.object({ values: z.array(z.string()) });
const arraySchema = z.object({ 'element-type': z.string() });
const routineSchema = z.object({ 'arg-type': z.string(), 'ret-type': z.string().optional() });

export function buildCapabilities(schema: readonly SchemaInfo[], migrationCaps: ReadonlyArray<{ capability: string }>): QmpCapabilities {
  const byName = new Map<string, SchemaInfo>();
  const commands = new Set<string>();
  const events = new Set<string>();
  for (const e of schema) {
    if (e['meta-type'] === 'command') commands.add(e.name);
    else if (e['meta-type'] === 'event') events.add(e.name);
    // Commands, events and types live in one namespace in QAPI; keep the first of each name.
    if (!byName.has(e.name)) byName.set(e.name, e);
  }

  /** Member names of an object type, its variants' members included (one level). */
  const membersOf = (typeName: string): Map<string, string> => {
    const out = new Map<string, string>();
    const obj = objectSchema.safeParse(byName.get(typeName));
    if (!obj.success) return out;
    for (const m of obj.data.members) out.set(m.name, m.type);
    for (const v of obj.data.variants ?? []) {
      const vo = objectSchema.safeParse(byName.get(v.type));
      if (vo.success) for (const m of vo.data.members) if (!out.has(m.name)) out.set(m.name, m.type);
    }
    return out;
  };
  const argType = (routine: string): string | undefined => {
    const r = routineSchema.safeParse(byName.get(routine));
    return r.success ? r.data['arg-type'] : undefined;
  };
  const elementOf = (typeName: string): string | undefined => {
    const a = arraySchema.safeParse(byName.get(typeName));
    return a.success ? a.data['element-type'] : undefined;
  };

  const resolve = (path: string): string | undefined => {
    const colon = path.indexOf(':');
    if (colon < 0) return undefined;
    const routine = byName.get(path.slice(0, colon));
    const r = routineSchema.safeParse(routine);
    if (!r.success) return undefined;
    let steps = path.slice(colon + 1).split('.');
    let type: string | undefined = r.data['arg-type'];
    if (steps[0]?.startsWith('return')) {
      type = r.data['ret-type'];
      steps = [steps[0].slice('return'.length), ...steps.slice(1)].filter((s) => s !== '');
    }
    for (const raw of steps) {
      if (type === undefined) return undefined;
      let step = raw;
      let unwraps = 0;
      while (step.endsWith('[]')) {
        step = step.slice(0, -2);
        unwraps++;
      }
      if (step !== '') type = membersOf(type).get(step);
      for (let i = 0; i < unwraps && type !== undefined; i++) type = elementOf(type);
    }
    return type;
  };

  const enumCache = new Map<string, ReadonlySet<string> | undefined>();
  const enumValues = (typeName: string): ReadonlySet<string> | undefined => {
    if (enumCache.has(typeName)) return enumCache.get(typeName);
    let values: ReadonlySet<string> | undefined;
    // A schema that does name its types (an older QEMU, a fake) is taken at its word first.
    const direct = enumSchema.safeParse(byName.get(typeName));
    if (byName.get(typeName)?.['meta-type'] === 'enum' && direct.success) {
      values = new Set(direct.data.values);
    } else {
      const at = resolve(enumPaths[typeName] ?? typeName);
      const e = at === undefined ? undefined : byName.get(at);
      const parsed = enumSchema.safeParse(e);
      if (e?.['meta-type'] === 'enum' && parsed.success) values = new Set(parsed.data.values);
    }
    enumCache.set(typeName, values);
    return values;
  };

  const migrateParams = new Set(membersOf(argType('migrate-set-parameters') ?? '').keys());
  const migrationCapabilities = new Set(migrationCaps.map((c) => c.capability));

  return {
    commands,
    events,
    hasCommand: (name) => commands.has(name),
    hasArgument: (command, argument) => {
      if (!commands.has(command)) return false;
      const t = argType(command);
      return t !== undefined && membersOf(t).has(argument);
    },
    enumValues,
    migrationCapabilities,
    hasMigrationParameter: (name) => migrateParams.has(name),
  };
}
