# IAM: one execution role per service (pull its image, write its logs, read exactly its
# secrets) and one task role per service (what the code itself may call: only the gateway
# needs anything, Bedrock).

locals {
  # The secrets each service's container receives; the execution role may read these and
  # no others. The container definitions in ecs.tf inject exactly these lists.
  service_secrets = {
    master        = ["REDIS_PASSWORD", "WORKER_TOKEN", "API_KEYS", "OPERATOR_API_KEYS", "CALLBACK_SECRET"]
    worker        = ["REDIS_PASSWORD", "WORKER_TOKEN", "GATEWAY_TOKEN"]
    "llm-gateway" = ["REDIS_PASSWORD", "GATEWAY_TOKEN", "GEMINI_API_KEY"]
  }
}

data "aws_iam_policy_document" "ecs_tasks_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ecs-tasks.amazonaws.com"]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }
  }
}

resource "aws_iam_role" "execution" {
  for_each = local.service_secrets

  name               = "${local.prefix}-${each.key}-execution"
  assume_role_policy = data.aws_iam_policy_document.ecs_tasks_assume.json
}

resource "aws_iam_role_policy_attachment" "execution" {
  for_each = local.service_secrets

  role       = aws_iam_role.execution[each.key].name
  policy_arn = "arn:${local.partition}:iam::aws:policy/service-role/AmazonECSTaskExecutionRolePolicy"
}

resource "aws_iam_role_policy" "execution_secrets" {
  for_each = local.service_secrets

  name = "read-own-secrets"
  role = aws_iam_role.execution[each.key].id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        Sid      = "ReadOwnSecrets"
        Effect   = "Allow"
        Action   = ["secretsmanager:GetSecretValue"]
        Resource = [for name in each.value : local.secret_arns[name]]
      },
      {
        Sid      = "DecryptOwnSecrets"
        Effect   = "Allow"
        Action   = ["kms:Decrypt"]
        Resource = [aws_kms_key.main.arn]
        Condition = {
          StringEquals = { "kms:ViaService" = "secretsmanager.${var.region}.amazonaws.com" }
        }
      },
    ]
  })
}

resource "aws_iam_role" "task" {
  for_each = local.service_secrets

  name               = "${local.prefix}-${each.key}-task"
  assume_role_policy = data.aws_iam_policy_document.ecs_tasks_assume.json
}

resource "aws_iam_role_policy" "gateway_bedrock" {
  name = "invoke-bedrock"
  role = aws_iam_role.task["llm-gateway"].id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Sid      = "InvokeModels"
      Effect   = "Allow"
      Action   = ["bedrock:InvokeModel", "bedrock:InvokeModelWithResponseStream"]
      Resource = var.bedrock_model_arns
    }]
  })
}

# Agent sidecars' own secrets (worker_groups[*].agent.secrets): the worker execution role,
# which every worker group shares, may read exactly those. Their OPENAI_API_KEY is the
# workers' GATEWAY_TOKEN, already readable above. A secret or parameter encrypted with a
# customer managed key other than this stack's needs kms:Decrypt granted in that key's
# policy; the AWS managed keys (aws/secretsmanager, aws/ssm) need nothing more.
locals {
  agent_secret_arns = distinct(flatten([
    for g in values(var.worker_groups) : values(g.agent.secrets) if g.agent != null
  ]))
  agent_secretsmanager_arns = [for arn in local.agent_secret_arns : arn if can(regex("^arn:[^:]+:secretsmanager:", arn))]
  agent_ssm_arns            = [for arn in local.agent_secret_arns : arn if can(regex("^arn:[^:]+:ssm:", arn))]
}

resource "aws_iam_role_policy" "execution_agent_secrets" {
  count = length(local.agent_secret_arns) > 0 ? 1 : 0

  name = "read-agent-secrets"
  role = aws_iam_role.execution["worker"].id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = concat(
      length(local.agent_secretsmanager_arns) == 0 ? [] : [{
        Sid      = "ReadAgentSecrets"
        Effect   = "Allow"
        Action   = ["secretsmanager:GetSecretValue"]
        Resource = local.agent_secretsmanager_arns
      }],
      length(local.agent_ssm_arns) == 0 ? [] : [{
        Sid      = "ReadAgentParameters"
        Effect   = "Allow"
        Action   = ["ssm:GetParameters"]
        Resource = local.agent_ssm_arns
      }],
    )
  })
}
