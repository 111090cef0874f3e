# Security groups, as in the deployment guide: ALB → master 8000; master → workers 5000;
# workers → master 8000 (results go to MASTER_URL); master and workers → gateway 7000;
# master, workers and gateway → Redis 6379 (the gateway keeps its usage ledger, budgets,
# cache and replay records there). Tasks reach AWS APIs, ECR and Gemini over HTTPS through the NAT gateway.

resource "aws_security_group" "alb" {
  name        = "${local.prefix}-alb"
  description = "Public ALB: HTTPS (and HTTP, redirected) in, master port out"
  vpc_id      = aws_vpc.main.id
}

resource "aws_security_group" "master" {
  name        = "${local.prefix}-master"
  description = "Master tasks"
  vpc_id      = aws_vpc.main.id
}

resource "aws_security_group" "workers" {
  name        = "${local.prefix}-workers"
  description = "Worker tasks, every capability"
  vpc_id      = aws_vpc.main.id
}

resource "aws_security_group" "gateway" {
  name        = "${local.prefix}-llm-gateway"
  description = "llm-gateway tasks"
  vpc_id      = aws_vpc.main.id
}

resource "aws_security_group" "redis" {
  name        = "${local.prefix}-redis"
  description = "ElastiCache: reachable from master and workers only"
  vpc_id      = aws_vpc.main.id
}

# --- ALB
resource "aws_vpc_security_group_ingress_rule" "alb_https" {
  security_group_id = aws_security_group.alb.id
  description       = "HTTPS from clients"
  cidr_ipv4         = "0.0.0.0/0"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
}

resource "aws_vpc_security_group_ingress_rule" "alb_http" {
  #checkov:skip=CKV_AWS_260:Port 80 only answers a redirect to HTTPS (aws_lb_listener.http); no request is forwarded over plain HTTP.
  security_group_id = aws_security_group.alb.id
  description       = "HTTP from clients, redirected to HTTPS"
  cidr_ipv4         = "0.0.0.0/0"
  ip_protocol       = "tcp"
  from_port         = 80
  to_port           = 80
}

resource "aws_vpc_security_group_egress_rule" "alb_to_master" {
  security_group_id            = aws_security_group.alb.id
  description                  = "Forward to master tasks"
  referenced_security_group_id = aws_security_group.master.id
  ip_protocol                  = "tcp"
  from_port                    = 8000
  to_port                      = 8000
}

# --- master
resource "aws_vpc_security_group_ingress_rule" "master_from_alb" {
  security_group_id            = aws_security_group.master.id
  description                  = "Client requests and health checks from the ALB"
  referenced_security_group_id = aws_security_group.alb.id
  ip_protocol                  = "tcp"
  from_port                    = 8000
  to_port                      = 8000
}

resource "aws_vpc_security_group_ingress_rule" "master_from_workers" {
  security_group_id            = aws_security_group.master.id
  description                  = "Step results from workers (POST /result)"
  referenced_security_group_id = aws_security_group.workers.id
  ip_protocol                  = "tcp"
  from_port                    = 8000
  to_port                      = 8000
}

resource "aws_vpc_security_group_egress_rule" "master_to_workers" {
  security_group_id            = aws_security_group.master.id
  description                  = "Dispatch steps to workers (POST /work)"
  referenced_security_group_id = aws_security_group.workers.id
  ip_protocol                  = "tcp"
  from_port                    = 5000
  to_port                      = 5000
}

resource "aws_vpc_security_group_egress_rule" "master_to_gateway" {
  security_group_id            = aws_security_group.master.id
  description                  = "llm-gateway"
  referenced_security_group_id = aws_security_group.gateway.id
  ip_protocol                  = "tcp"
  from_port                    = 7000
  to_port                      = 7000
}

resource "aws_vpc_security_group_egress_rule" "gateway_to_redis" {
  security_group_id            = aws_security_group.gateway.id
  description                  = "Redis"
  referenced_security_group_id = aws_security_group.redis.id
  ip_protocol                  = "tcp"
  from_port                    = 6379
  to_port                      = 6379
}

resource "aws_vpc_security_group_egress_rule" "master_to_redis" {
  security_group_id            = aws_security_group.master.id
  description                  = "Redis"
  referenced_security_group_id = aws_security_group.redis.id
  ip_protocol                  = "tcp"
  from_port                    = 6379
  to_port                      = 6379
}

resource "aws_vpc_security_group_egress_rule" "master_https" {
  security_group_id = aws_security_group.master.id
  description       = "HTTPS to ECR, Secrets Manager, CloudWatch Logs (through NAT)"
  cidr_ipv4         = "0.0.0.0/0"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
}

# --- workers
resource "aws_vpc_security_group_ingress_rule" "workers_from_master" {
  security_group_id            = aws_security_group.workers.id
  description                  = "Steps from the master (POST /work)"
  referenced_security_group_id = aws_security_group.master.id
  ip_protocol                  = "tcp"
  from_port                    = 5000
  to_port                      = 5000
}

resource "aws_vpc_security_group_egress_rule" "workers_to_master" {
  security_group_id            = aws_security_group.workers.id
  description                  = "Results to the master"
  referenced_security_group_id = aws_security_group.master.id
  ip_protocol                  = "tcp"
  from_port                    = 8000
  to_port                      = 8000
}

resource "aws_vpc_security_group_egress_rule" "workers_to_gateway" {
  security_group_id            = aws_security_group.workers.id
  description                  = "LLM calls"
  referenced_security_group_id = aws_security_group.gateway.id
  ip_protocol                  = "tcp"
  from_port                    = 7000
  to_port                      = 7000
}

resource "aws_vpc_security_group_egress_rule" "workers_to_redis" {
  security_group_id            = aws_security_group.workers.id
  description                  = "Redis (registration and heartbeat)"
  referenced_security_group_id = aws_security_group.redis.id
  ip_protocol                  = "tcp"
  from_port                    = 6379
  to_port                      = 6379
}

resource "aws_vpc_security_group_egress_rule" "workers_https" {
  security_group_id = aws_security_group.workers.id
  description       = "HTTPS to ECR, Secrets Manager, CloudWatch Logs (through NAT)"
  cidr_ipv4         = "0.0.0.0/0"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
}

# --- llm-gateway
resource "aws_vpc_security_group_ingress_rule" "gateway_from_workers" {
  security_group_id            = aws_security_group.gateway.id
  description                  = "LLM calls from workers"
  referenced_security_group_id = aws_security_group.workers.id
  ip_protocol                  = "tcp"
  from_port                    = 7000
  to_port                      = 7000
}

resource "aws_vpc_security_group_ingress_rule" "gateway_from_master" {
  security_group_id            = aws_security_group.gateway.id
  description                  = "LLM calls from the master"
  referenced_security_group_id = aws_security_group.master.id
  ip_protocol                  = "tcp"
  from_port                    = 7000
  to_port                      = 7000
}

resource "aws_vpc_security_group_egress_rule" "gateway_https" {
  security_group_id = aws_security_group.gateway.id
  description       = "HTTPS to Bedrock, Gemini, ECR, Secrets Manager, CloudWatch Logs (through NAT)"
  cidr_ipv4         = "0.0.0.0/0"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
}

# --- Redis
resource "aws_vpc_security_group_ingress_rule" "redis_from_master" {
  security_group_id            = aws_security_group.redis.id
  description                  = "Redis from master tasks"
  referenced_security_group_id = aws_security_group.master.id
  ip_protocol                  = "tcp"
  from_port                    = 6379
  to_port                      = 6379
}

resource "aws_vpc_security_group_ingress_rule" "redis_from_gateway" {
  security_group_id            = aws_security_group.redis.id
  description                  = "Redis from llm-gateway tasks"
  referenced_security_group_id = aws_security_group.gateway.id
  ip_protocol                  = "tcp"
  from_port                    = 6379
  to_port                      = 6379
}

resource "aws_vpc_security_group_ingress_rule" "redis_from_workers" {
  security_group_id            = aws_security_group.redis.id
  description                  = "Redis from worker tasks"
  referenced_security_group_id = aws_security_group.workers.id
  ip_protocol                  = "tcp"
  from_port                    = 6379
  to_port                      = 6379
}
