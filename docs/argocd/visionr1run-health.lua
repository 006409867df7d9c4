-- Argo CD health of a visionr1.io VisionR1Run, read from the conditions the operator
-- writes (Ready, Succeeded, Failed, Suspended, InvalidSpec). Lua 5.1: Argo CD runs
-- gopher-lua. docs/argocd/argocd-cm.yaml carries this same text (a test keeps them equal).

local function find_condition(conditions, wanted)
  for _, c in ipairs(conditions) do
    if c.type == wanted then
      return c
    end
  end
  return nil
end

local function is_true(c)
  return c ~= nil and c.status == "True"
end

local function health(status, c, fallback)
  local message = fallback
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    message = c.message
  elseif c ~= nil and c.reason ~= nil and c.reason ~= "" then
    message = c.reason
  end
  return { status = status, message = message }
end

local status = obj.status
if status == nil or status.conditions == nil or #status.conditions == 0 then
  return health("Progressing", nil, "waiting for the operator to pick up the run")
end
local conditions = status.conditions

-- A finished run is a record: the operator acts on it no more, so a spec edited
-- afterwards is never observed. Its outcome stands whatever the generations say.
local succeeded = find_condition(conditions, "Succeeded")
if is_true(succeeded) then
  return health("Healthy", succeeded, "every stage succeeded")
end
local failed = find_condition(conditions, "Failed")
if is_true(failed) then
  return health("Degraded", failed, "a stage failed")
end

-- Conditions written for an older spec say nothing about the current one.
local generation = obj.metadata.generation
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  return health("Progressing", nil, "the operator has not acted on spec generation " .. generation ..
    " yet (status is of generation " .. status.observedGeneration .. ")")
end

local invalid = find_condition(conditions, "InvalidSpec")
if is_true(invalid) then
  return health("Degraded", invalid, "the spec is invalid")
end
local suspended = find_condition(conditions, "Suspended")
if is_true(suspended) then
  return health("Suspended", suspended, "spec.suspend is true")
end
return health("Progressing", find_condition(conditions, "Ready"), "the run is in progress")
